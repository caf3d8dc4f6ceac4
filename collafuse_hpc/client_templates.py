"""Many clients in a config without copy-paste: a ``template`` item of ``clients``
stands for ``count`` clients, expanded before the config is built and validated,
so everything downstream sees hand-written clients::

    clients:
      - template:
          count: 100
          id: "c{k}"                              # {k}: 0..count-1
          shard: "data/mnist/client_{k}.h5"
          cut_ratio: {choice: [0.2, 0.5], seed: 0}   # a seeded draw per client
          batch_size: {each: [16, 32, ...]}          # one value per client, count of them
          model: {base_channels: 16}                 # any other value: the same for every client

Strings are formatted with ``k`` (``"c{k}"``, ``"client_{k:03d}.h5"``). A template
may sit among hand-written clients; the expanded clients take its place in order.
``--set`` overrides apply to the config as written (``clients.0.template.count=8``).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def expand(raw: dict) -> dict:
    """``raw`` with every client template replaced by its clients (a new dict; the
    input is not changed). ValueError naming the key for a malformed template."""
    clients = raw.get("clients")
    if not isinstance(clients, list) or not any(isinstance(c, dict) and "template" in c for c in clients):
        return raw
    out = []
    for i, item in enumerate(clients):
        if isinstance(item, dict) and "template" in item:
            out += _clients(item, f"clients.{i}")
        else:
            out.append(item)
    return {**raw, "clients": out}


def _clients(item: dict, key: str) -> list[dict]:
    if set(item) != {"template"} or not isinstance(item["template"], dict):
        raise ValueError(f"config key '{key}': a template item holds only 'template: {{count: N, ...}}'")
    template = dict(item["template"])
    count = template.pop("count", None)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"config key '{key}.template.count' must be an integer >= 1, got {count!r}")
    if "{k" not in str(template.get("id", "")):
        raise ValueError(f"config key '{key}.template.id' must contain {{k}} (e.g. 'c{{k}}'): ids are unique")
    values = {name: _per_client(value, count, f"{key}.template.{name}") for name, value in template.items()}
    return [{name: _format(v[k], k, f"{key}.template.{name}") for name, v in values.items()} for k in range(count)]


def _per_client(value: Any, count: int, key: str) -> list:
    """``count`` values: {each: [...]}, {choice: [...], seed: s}, or the same value."""
    if isinstance(value, dict) and "each" in value:
        each = value["each"]
        if set(value) != {"each"} or not isinstance(each, list) or len(each) != count:
            got = len(each) if isinstance(each, list) else type(each).__name__
            raise ValueError(f"config key '{key}.each' must be a list of count = {count} values, got {got}")
        return each
    if isinstance(value, dict) and "choice" in value:
        options, seed = value["choice"], value.get("seed", 0)
        if set(value) - {"choice", "seed"} or not isinstance(options, list) or not options:
            raise ValueError(f"config key '{key}': a seeded rule is {{choice: [values...], seed: int}}")
        picks = np.random.default_rng(seed).integers(len(options), size=count)
        return [options[p] for p in picks]
    return [value] * count


def _format(value: Any, k: int, key: str) -> Any:
    """``value`` with ``{k}`` filled in, recursively in strings, lists and mappings."""
    if isinstance(value, str):
        try:
            return value.format(k=k)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"config key '{key}': {value!r} cannot be formatted with k ({e})") from None
    if isinstance(value, list):
        return [_format(v, k, key) for v in value]
    if isinstance(value, dict):
        return {name: _format(v, k, f"{key}.{name}") for name, v in value.items()}
    return value
