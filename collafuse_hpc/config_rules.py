"""What a valid config is, and what may change on ``--resume``.

The rules are data where they can be (:data:`CHOICES`, :data:`RANGES`,
:data:`RESUMABLE`), so :func:`validate` and the generated reference
(``collafuse-hpc config --reference``, config_reference.py) read one source.
Keys are dotted paths; ``*`` stands for any list index or section name.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from collafuse_hpc.results.schema import SETS

if TYPE_CHECKING:
    from collafuse_hpc.config import Config

CLIENT_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")

CHOICES = {
    "run.method": ("split", "federated"),
    "federated.server_optimizer": ("fedavg", "fedadam"),
    "federated.architecture": ("server", "client"),
    "diffusion.schedule": ("linear", "cosine"),
    "diffusion.split": ("markov", "reference"),
    "diffusion.sampler": ("ddpm", "ddim"),
    "server.device": ("auto", "cpu", "cuda"),
    "server.aggregate": ("concat", "sequential"),
    "clients.*.device": ("auto", "cpu", "cuda"),
    "clients.*.wire_dtype": ("float32", "bfloat16", "float16"),
    "fault.mode": ("raise", "exit", "slow_write"),
    "eval.extractor": ("inception", "classifier", "pixels"),
    "eval.device": ("auto", "cpu", "cuda"),
    "eval.sets.*": SETS,
}


@dataclass(frozen=True)
class Range:
    """A closed or half-open interval; ``hi`` may name another key (``diffusion.timesteps``);
    ``or_zero``: 0 (off) is valid too."""

    lo: float
    hi: float | str | None = None
    lo_open: bool = False
    hi_open: bool = False
    or_zero: bool = False

    def bounds(self, values: dict[str, Any]) -> tuple[float, float | None]:
        return self.lo, values[self.hi] if isinstance(self.hi, str) else self.hi

    def holds(self, value: float, values: dict[str, Any]) -> bool:
        lo, hi = self.bounds(values)
        above = value > lo if self.lo_open else value >= lo
        below = hi is None or (value < hi if self.hi_open else value <= hi)
        return (above and below) or (self.or_zero and value == 0)

    def describe(self, values: dict[str, Any] | None = None) -> str:
        """``>= 1``, ``> 0``, ``in [0, 1)``; with ``values`` a named bound is resolved."""
        hi = self.hi if values is None else self.bounds(values)[1]
        if hi is None:
            text = f"{'>' if self.lo_open else '>='} {self.lo:g}"
        else:
            hi_text = hi if isinstance(hi, str) else f"{hi:g}"
            text = f"in {'(' if self.lo_open else '['}{self.lo:g}, {hi_text}{')' if self.hi_open else ']'}"
        return f"0 or {text}" if self.or_zero else text


POSITIVE, AT_LEAST_1, AT_LEAST_2, NON_NEGATIVE = Range(0, lo_open=True), Range(1), Range(2), Range(0)
RANGES = {
    "data.image_size": AT_LEAST_1,
    "data.channels": AT_LEAST_1,
    "data.num_classes": NON_NEGATIVE,
    "diffusion.timesteps": AT_LEAST_1,
    "diffusion.sampling_steps": Range(0, "diffusion.timesteps"),
    "diffusion.eta": Range(0, 1),
    "*.model.base_channels": AT_LEAST_1,
    "*.model.num_res_blocks": AT_LEAST_1,
    "*.model.dropout": Range(0, 1, hi_open=True),
    "*.model.channel_mult.*": AT_LEAST_1,
    "run.rounds": AT_LEAST_1,
    "run.log_every": AT_LEAST_1,
    "run.samples_per_client": AT_LEAST_1,
    "run.sample_batch": AT_LEAST_1,
    "run.keep_checkpoints": AT_LEAST_1,
    "run.stop_check_every": AT_LEAST_1,
    "run.clients_per_rank": AT_LEAST_1,
    "run.checkpoint_every": NON_NEGATIVE,
    "run.profile_rounds": NON_NEGATIVE,
    "run.threads": NON_NEGATIVE,
    "run.timeout_s": POSITIVE,
    "run.work_timeout_s": POSITIVE,
    "run.stop_grace_s": POSITIVE,
    "run.watchdog_s": NON_NEGATIVE,
    "fault.delay_s": NON_NEGATIVE,
    "eval.images": AT_LEAST_2,
    "eval.kid_subsets": AT_LEAST_2,
    "eval.kid_subset_size": AT_LEAST_2,
    "eval.batch": AT_LEAST_2,
    "eval.max_image_steps": NON_NEGATIVE,
    "eval.bootstrap": Range(2, or_zero=True),  # an interval's spread needs 2 resamples; 0: no intervals
    "eval.timing_repeats": AT_LEAST_1,
    "clients.*.cut_ratio": Range(0, 1),
    "clients.*.cut_step": Range(0, "diffusion.timesteps"),
    "clients.*.batch_size": AT_LEAST_1,
    "federated.local_steps": AT_LEAST_1,
    "federated.server_lr": POSITIVE,
    "federated.finetune_steps": NON_NEGATIVE,
}

# Keys a resumed run may change: how long, how often, where and how fast it runs, and
# how it is evaluated, but not what it trains (any other difference refuses --resume).
# Shards may move (data staged elsewhere) but must hold the same images (preflight.py).
RESUMABLE = (
    "run.output_dir",
    "run.clients_per_rank",
    "run.rounds",
    "run.log_every",
    "run.checkpoint_every",
    "run.keep_checkpoints",
    "run.samples_per_client",
    "run.sample_batch",
    "run.threads",
    "run.timeout_s",
    "run.work_timeout_s",
    "run.stop_check_every",
    "run.stop_grace_s",
    "run.watchdog_s",
    "run.profile_rounds",
    "run.tensorboard",
    "diffusion.sampling_steps",
    "diffusion.sampler",
    "diffusion.eta",
    "server.device",
    "server.compile",
    "clients.*.device",
    "clients.*.compile",
    "clients.*.shard",
    "clients.*.allow_centralized",
    "clients.*.allow_new_shard",
    "eval.*",
    "fault.*",
    "federated.finetune_steps",
)


# Keys --set may change when a command takes a trained run (its folder or results.h5) instead of a config:
# how it is evaluated and sampled, on which devices and threads, and where its shards now are (they must
# hold the same images). The rest is the run's own: a config that trains something else belongs to a new run.
RUN_SETTABLE = (
    "eval.*",
    "diffusion.sampler",
    "diffusion.sampling_steps",
    "diffusion.eta",
    "run.samples_per_client",
    "run.sample_batch",
    "run.threads",
    "server.device",
    "clients.*.device",
    "clients.*.shard",
    "federated.finetune_steps",
)

# Keys each method ignores (what they set is named in a warning at the start and in the run's record).
IGNORED = {
    "federated": (
        "clients.*.cut_ratio",
        "clients.*.cut_step",
        "clients.*.share_labels",
        "clients.*.wire_dtype",
        "clients.*.allow_centralized",
        "server.aggregate",
        "diffusion.split",
    ),
    "split": ("federated.*",),
}


def matching(rules: dict[str, Any], key: str) -> Any:
    """The rule of the first pattern that matches dotted ``key``, or None."""
    return next((rule for pattern, rule in rules.items() if fnmatch.fnmatchcase(key, pattern)), None)


def resumable(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in RESUMABLE)


def run_settable(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in RUN_SETTABLE)


def flatten(node: Any, prefix: str = "", lists: bool = False) -> dict[str, Any]:
    """{"a.b.0.c": value}; lists of mappings are indexed (every list with ``lists``),
    other lists are values."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list) and node and (lists or all(isinstance(v, dict) for v in node)):
        items = ((str(i), v) for i, v in enumerate(node))
    else:
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key), lists))
    return out


def validate(cfg: Config, check_files: bool = True) -> None:
    """Raise ValueError naming the key for anything inconsistent."""
    if not cfg.clients:
        raise ValueError("config key 'clients' is empty; list at least one client")
    values = flatten(asdict(cfg), lists=True)
    for key, value in values.items():
        valid = matching(CHOICES, key)
        if valid is not None and value not in valid:
            raise ValueError(f"config key '{key}' is {value!r}; valid: {list(valid)}")
        rng = matching(RANGES, key)
        if rng is not None and value is not None and not rng.holds(value, values):
            raise ValueError(f"config key '{key}' must be {rng.describe(values)}, got {value}")
    if not cfg.eval.sets:
        raise ValueError(f"config key 'eval.sets' is []; give one or more of {list(SETS)}")
    _check_servers(cfg)
    _check_clients(cfg)
    if cfg.run.method == "federated":
        _check_federated(cfg)
    if check_files:
        refuse_missing(missing_shards(cfg))


def missing_shards(cfg: Config) -> dict[str, str]:
    """What to say of each client shard that does not exist, by its key: ``config``
    lists them (a job is planned before its data is prepared); every other command refuses."""
    return {
        f"clients.{i}.shard": (
            f"config key 'clients.{i}.shard': file {c.shard!r} not found (relative paths are taken from the "
            f"working directory {os.getcwd()!r}); make it with 'collafuse-hpc prepare' (docs/data.md)"
        )
        for i, c in enumerate(cfg.clients)
        if not os.path.isfile(c.shard)
    }


def refuse_missing(missing: dict[str, str]) -> None:
    """ValueError naming the first missing file and counting the others, if any is missing."""
    if missing:
        first, *more = missing.values()
        raise ValueError(first + (f" (and {len(more)} more: 'collafuse-hpc config CONFIG' lists them)" if more else ""))


def _check_servers(cfg: Config) -> None:
    if not 1 <= cfg.server.count <= len(cfg.clients):
        raise ValueError(
            f"config key 'server.count' is {cfg.server.count}; it must be in [1, number of clients "
            f"= {len(cfg.clients)}] (each server rank serves its own clients)"
        )
    if cfg.server.count > 1 and cfg.server.aggregate != "concat":
        raise ValueError(
            "config key 'server.aggregate' is 'sequential', which needs server.count: 1 "
            "(several server replicas step together on their concatenated batches)"
        )
    models = [("server.model", cfg.server.model)] + [(f"clients.{i}.model", c.model) for i, c in enumerate(cfg.clients)]
    for key, m in models:
        if not m.channel_mult:
            raise ValueError(f"config key '{key}.channel_mult' is []; give one multiplier >= 1 per level")


def _check_clients(cfg: Config) -> None:
    if not cfg.run.clients_per_round <= len(cfg.clients) or cfg.run.clients_per_round < 0:
        raise ValueError(
            f"config key 'run.clients_per_round' must be in [0, number of clients = {len(cfg.clients)}] "
            f"(0: every client), got {cfg.run.clients_per_round}"
        )
    per = cfg.run.clients_per_rank
    for first in range(0, len(cfg.clients), per):
        hosted = cfg.clients[first : first + per]
        for key in ("device", "wire_dtype"):  # one rank's clients run on one device and share messages
            values = sorted({getattr(c, key) for c in hosted})
            if len(values) > 1:
                raise ValueError(
                    f"clients {hosted[0].id!r}..{hosted[-1].id!r} share a rank (run.clients_per_rank = {per}) but "
                    f"ask for different {key} values {values}: give them one '{key}', or host fewer clients per rank"
                )
    ids = [c.id for c in cfg.clients]
    for i, c in enumerate(cfg.clients):
        key = f"clients.{i}"
        if not c.id:
            raise ValueError(f"config key '{key}.id' is missing; give each client a unique name")
        if not CLIENT_ID.fullmatch(c.id):
            raise ValueError(
                f"config key '{key}.id' is {c.id!r}; ids name files and HDF5 groups, so use letters, digits, "
                "'_', '-' and '.', not starting with '.' (e.g. 'c0', 'hospital_a')"
            )
        if ids.count(c.id) > 1:
            raise ValueError(f"config key '{key}.id': client id {c.id!r} is used twice")
        if c.cut_ratio is not None and c.cut_step is not None:  # a --set cut_step beside the YAML's cut_ratio
            raise ValueError(
                f"client {c.id!r} ('{key}') has both (cut_ratio {c.cut_ratio}, cut_step {c.cut_step}): set "
                f"{key}.cut_ratio=null to use cut_step, or {key}.cut_step=null to use cut_ratio"
            )
        if c.cut_ratio is None and c.cut_step is None and cfg.run.method == "split":
            raise ValueError(f"client {c.id!r} ('{key}') has neither: give one of cut_ratio or cut_step")
        if (c.labels or c.share_labels) and cfg.data.num_classes < 1:
            raise ValueError(f"client {c.id!r} ('{key}') uses labels, but 'data.num_classes' is 0")


def _check_federated(cfg: Config) -> None:
    """One global model: one server, and what defines the model the same for every client."""
    if cfg.server.count != 1:
        raise ValueError(
            f"config key 'server.count' is {cfg.server.count}, but run.method 'federated' averages on one server: "
            "set server.count=1"
        )
    keys = ["labels"] + (["model", "optim"] if cfg.federated.architecture == "client" else [])
    for key in keys:
        values = [getattr(c, key) for c in cfg.clients]
        if any(v != values[0] for v in values):
            odd = next(i for i, v in enumerate(values) if v != values[0])
            why = "" if key == "labels" else " with federated.architecture 'client'"
            raise ValueError(
                f"run.method 'federated' trains one global model, but 'clients.{odd}.{key}' differs from "
                f"'clients.0.{key}'{why}: give every client the same '{key}'"
                + (", or use federated.architecture=server" if key != "labels" else "")
            )


def ignored_keys(cfg: Config) -> dict[str, Any]:
    """{key: value} of each key the run's method ignores that is set away from its default
    (a split config turned federated keeps its cuts, say): named once at the start."""
    blank = type(cfg)(clients=[type(c)() for c in cfg.clients])  # the defaults, without importing config.py
    defaults = flatten(asdict(blank))
    values = flatten(asdict(cfg))
    patterns = IGNORED[cfg.run.method]
    if cfg.run.method == "federated":  # the global model is one side's: the other side's model goes unused
        unused = "clients.*" if cfg.federated.architecture == "server" else "server"
        patterns += (f"{unused}.model.*", f"{unused}.optim.*", f"{unused}.compile")
    return {
        key: value
        for key, value in values.items()
        if any(fnmatch.fnmatchcase(key, p) for p in patterns) and value != defaults.get(key)
    }


def ignored_warning(cfg: Config) -> str | None:
    """What ``train`` warns of at the start, and ``config`` and ``--dry-run`` print: the keys
    :func:`ignored_keys` names, grouped (None when the method ignores none)."""
    ignored = ignored_keys(cfg)
    if not ignored:
        return None
    return (
        f"run.method {cfg.run.method!r} ignores these keys of the config (kept in the run's record, "
        f"records/<n> attribute 'ignored'): {describe_keys(ignored)}"
    )


def describe_keys(values: dict[str, Any]) -> str:
    """``{dotted key: value}`` in one readable line: a client key once for every client
    that sets it, with the clients of each value (``clients.*.cut_ratio (clients 0-4: 0.2),
    server.aggregate='sequential'``), in the order the keys come."""
    groups: dict[str, dict[str, list[int]]] = {}  # key or client pattern -> value -> client indices
    for key, value in values.items():
        client = re.fullmatch(r"clients\.(\d+)\.(.+)", key)
        pattern = f"clients.*.{client[2]}" if client else key
        indices = groups.setdefault(pattern, {}).setdefault(repr(value), [])
        if client:
            indices.append(int(client[1]))
    out = []
    for pattern, by_value in groups.items():
        if not pattern.startswith("clients.*."):
            out.append(f"{pattern}={next(iter(by_value))}")
            continue
        each = (f"client{'s' if len(ks) > 1 else ''} {_spans(ks)}: {value}" for value, ks in by_value.items())
        out.append(f"{pattern} ({'; '.join(each)})")
    return ", ".join(out)


def _spans(indices: list[int]) -> str:
    """``0-4, 7`` for [0, 1, 2, 3, 4, 7]."""
    spans: list[list[int]] = []
    for k in sorted(indices):
        if spans and k == spans[-1][1] + 1:
            spans[-1][1] = k
        else:
            spans.append([k, k])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def resume_differences(saved: dict, current: dict) -> list[str]:
    """``'key: old -> new'`` for each key outside :data:`RESUMABLE` that differs between
    the config a run was started with (``saved``) and ``current`` (both as dicts)."""
    old, new = flatten(saved), flatten(current)
    if len(saved.get("clients", [])) != len(current.get("clients", [])):
        return [f"clients: {len(saved.get('clients', []))} -> {len(current.get('clients', []))} clients"]
    missing = object()
    return [
        f"{key}: {old.get(key, '(none)')!r} -> {new.get(key, '(none)')!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key, missing) != new.get(key, missing) and not resumable(key)
    ]


def changed_keys(before: dict, after: dict) -> dict[str, Any]:
    """``{key: new value}`` for every dotted key whose value differs between two configs
    (as dicts): what an invocation changed relative to the run it writes into."""
    old, new = flatten(before), flatten(after)
    return {key: new.get(key) for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)}
