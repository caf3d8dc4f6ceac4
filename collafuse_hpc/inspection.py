"""Reading results files: ``collafuse-hpc inspect``, ``export`` and ``compare``.

Works on the files of finished, running and crashed runs alike: whatever is
missing (a role's part file, its summary, samples, metrics) is listed under
``missing`` instead of failing.
"""

from __future__ import annotations

import json
import math
import os

import h5py
import numpy as np
import yaml

from .checkpoint import complete_rounds
from .data.shard import SCHEMA as SHARD_SCHEMA
from .evaluate import SETS
from .results import SCHEMA, save_grid
from .wire import Kind


def open_results(path: str) -> h5py.File:
    """Open a results file for reading; ValueError saying what the file is otherwise
    (not HDF5, a client shard, another HDF5 file)."""
    hint = "pass the results.h5 in a run's output_dir"
    try:
        f = h5py.File(path, "r", locking=False)  # never in the way of a live run's writers
    except OSError as e:
        if "locking flag values don't match" not in str(e):
            raise ValueError(f"{path!r} is not a readable HDF5 file ({e}); {hint}") from None
        f = h5py.File(path, "r")  # this process already has it open with HDF5's lock
    schema = f.attrs.get("schema")
    if schema != SCHEMA:
        f.close()
        what = (
            "a client shard (made by collafuse-hpc prepare)"
            if schema == SHARD_SCHEMA
            else f"an HDF5 file with schema {schema!r}"
        )
        raise ValueError(f"{path!r} is {what}, not a collafuse-hpc results file; {hint}")
    return f


def _tail(values: np.ndarray) -> float | None:
    """Mean over the last 10% of rounds (None when there is nothing finite)."""
    tail = values[-max(1, len(values) // 10) :]
    return float(np.nanmean(tail)) if len(tail) and np.isfinite(tail).any() else None


def _plain(value):
    """h5py/numpy attribute values as JSON-friendly Python values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode()
    return value


def _role(g: h5py.Group) -> dict:
    out: dict = {"attrs": {k: _plain(v) for k, v in g.attrs.items()}}
    rounds = g.get("rounds")
    if rounds is not None and "round" in rounds:
        out["rounds_logged"] = len(rounds["round"])
        out["last_round"] = int(rounds["round"][-1]) if len(rounds["round"]) else None
        for name in rounds:
            if name != "round":
                out.setdefault("tail_means", {})[name] = _tail(rounds[name][()])
    for group in ("summary", "audit"):
        if group in g:
            out[group] = {k: _plain(v) for k, v in g[group].attrs.items()}
    if "audit" in out:  # totals from the rows: a run that did not finish has no total attributes yet
        a = g["audit"]
        column = {name: a[name][()] if name in a else np.zeros(0, np.int64) for name in ("kind", "images", "nbytes")}
        out["audit"]["training_messages"] = int((column["kind"] == Kind.TRAIN).sum())
        out["audit"].setdefault("images_sent", int(column["images"].sum()))
        out["audit"].setdefault("bytes_sent", int(column["nbytes"].sum()))
        out["audit"].setdefault("t_c", g.attrs.get("t_c"))
    if "samples/images" in g:
        out["samples"] = list(g["samples/images"].shape)
    return out


def summarize(path: str) -> dict:
    """Everything a person asks of a results file, as a dict (``inspect --json`` prints it)."""
    out: dict = {"file": path, "missing": []}
    with open_results(path) as f:
        out["attrs"] = {k: _plain(v) for k, v in f.attrs.items() if k not in ("config", "roles")}
        out["config"] = yaml.safe_load(f.attrs.get("config", "{}"))
        roles = yaml.safe_load(f.attrs.get("roles", "{}")) or {}
        out["roles"] = {}
        for key, part in roles.items():
            try:
                g = f[key]
            except KeyError:
                out["missing"].append(f"{key}: part file {part} (the rank never started or its file was lost)")
                continue
            role = _role(g)
            out["roles"][key] = role
            if "summary" not in role:
                last = role.get("last_round")
                done = f"last round logged {last}" if last is not None else "no round logged"
                out["missing"].append(f"{key}: summary (the run did not finish; {done})")
            if key.startswith("clients/") and "samples" not in role:
                out["missing"].append(f"{key}: samples")
        if "metrics" in f:
            out["metrics"] = {"attrs": {k: _plain(v) for k, v in f["metrics"].attrs.items()}}
            for who, g in f["metrics"].items():
                order = sorted(g, key=lambda n: SETS.index(n) if n in SETS else len(SETS))
                out["metrics"][who] = {name: {k: _plain(v) for k, v in g[name].attrs.items()} for name in order}
        else:
            out["missing"].append("metrics (not evaluated: collafuse-hpc evaluate CONFIG)")
    out["checkpoints"] = complete_rounds(os.path.dirname(os.path.abspath(path)))
    return out


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_summary(s: dict) -> str:
    """The summary as readable text."""
    a, cfg = s["attrs"], s["config"] or {}
    lines = [
        f"{s['file']}: {a.get('schema')} v{a.get('schema_version')}, package {a.get('package_version')}, "
        f"torch {a.get('torch_version')}, seed {a.get('seed')}, created {a.get('created')}",
        f"  config: {cfg.get('run', {}).get('rounds')} rounds, T={cfg.get('diffusion', {}).get('timesteps')} "
        f"({cfg.get('diffusion', {}).get('schedule')}, {cfg.get('diffusion', {}).get('split')} split), "
        f"{cfg.get('server', {}).get('count', 1)} server(s), {len(cfg.get('clients', []))} client(s)",
        f"  checkpoint sets: {s['checkpoints'] or 'none'}",
    ]
    for key, r in s["roles"].items():
        at = r["attrs"]
        cut = f" t_c={at['t_c']} (c={at['cut_ratio']:.2f})" if "t_c" in at else ""
        losses = ", ".join(f"{k} {_fmt(v)}" for k, v in r.get("tail_means", {}).items() if k.startswith("loss"))
        lines.append(
            f"  {key}{cut}: rank {at.get('rank')} on {at.get('host')}, {r.get('rounds_logged', 0)} rounds logged"
        )
        if losses:
            lines.append(f"    losses (mean of the last 10%): {losses}")
        summ = r.get("summary", {})
        times = ", ".join(f"{k[5:]} {v:.1f} s" for k, v in summ.items() if k.startswith("time_"))
        if summ:
            lines.append(f"    {summ.get('images')} images, {_fmt(summ.get('images_per_s'))} images/s; {times}")
        if "audit" in r:
            au = r["audit"]
            lines.append(
                f"    audit: {au.get('images_sent', '?')} images in {au.get('training_messages')} training messages, "
                f"{au.get('bytes_sent', '?')} bytes sent, t_c={au.get('t_c', '?')}"
            )
        if "samples" in r:
            lines.append(f"    samples: {r['samples']} uint8")
    m = s.get("metrics")
    if m:
        lines.append(
            f"  metrics ({m['attrs'].get('extractor')}, checkpoint round {m['attrs'].get('checkpoint_round')}):"
        )
        for who, sets in m.items():
            if who == "attrs":
                continue
            for name, v in sets.items():
                if "fid" in v:
                    lines.append(
                        f"    {who:<10} {name:<14} FID {_fmt(v['fid'])}  KID {_fmt(v['kid_mean'])} "
                        f"+- {_fmt(v['kid_std'])}  ({v['images']} vs {v['real_images']} real)"
                    )
            if "disclosure" in sets:
                d = sets["disclosure"]
                lines.append(
                    f"    {who:<10} disclosure: SNR {_fmt(d['snr'])}, PSNR {_fmt(d['psnr_db'])} dB, SSIM "
                    f"{_fmt(d['ssim'])}, mu {_fmt(d['mu_per_release'])} x sqrt({d['releases']}) = "
                    f"{_fmt(d['mu_composed'])}: {d['reading']}"
                )
            if "compute" in sets:
                c = sets["compute"]
                lines.append(
                    f"    {who:<10} client compute: sampling {_fmt(c['sampling_time_ratio'])} of local-only time "
                    f"(ideal {_fmt(c['sampling_ideal_ratio'])}), training step {_fmt(c['train_time_ratio'])}"
                )
    for item in s["missing"]:
        lines.append(f"  missing: {item}")
    return "\n".join(lines)


def export(path: str, out_dir: str, arrays: bool = False) -> list[str]:
    """Write each client's samples and each evaluated image set as PNG grids (and
    ``.npy`` arrays with ``arrays``) into ``out_dir``; returns the files written
    (none, and no folder made, when the file holds no images)."""
    images = {}
    with open_results(path) as f:
        for cid in f.get("clients", {}):
            try:
                g = f[f"clients/{cid}"]
            except KeyError:  # a part file that is missing
                continue
            if "samples/images" in g:
                images[f"samples_{cid}"] = g["samples/images"][()]
        for who, g in f.get("metrics", {}).items():
            for name, s in g.items():
                if "images" in s:
                    images[f"{who}_{name}"] = s["images"][()]
    written = []
    for name, array in images.items():
        os.makedirs(out_dir, exist_ok=True)
        png = os.path.join(out_dir, f"{name}.png")
        save_grid(array, png)
        written.append(png)
        if arrays:
            npy = os.path.join(out_dir, f"{name}.npy")
            np.save(npy, array)
            written.append(npy)
    return written


COMPARE_ROWS = (
    ("extractor (FID/KID features)", lambda s: s["metrics"]["attrs"]["extractor"]),
    ("rounds", lambda s: s["config"]["run"]["rounds"]),
    ("cut ratio(s)", lambda s: sorted({c.get("cut_ratio") for c in s["config"]["clients"]}, key=str)),
    ("server images/s", lambda s: s["roles"].get("server", {}).get("summary", {}).get("images_per_s")),
    ("server loss", lambda s: s["roles"].get("server", {}).get("tail_means", {}).get("loss_server")),
    ("bytes sent", lambda s: sum(r.get("audit", {}).get("bytes_sent", 0) for r in s["roles"].values())),
)


def compare(paths: list[str]) -> tuple[list[str], list[list]]:
    """Side-by-side rows (name, value per file) of the headline numbers of ``paths``."""
    summaries = [summarize(p) for p in paths]
    rows = []
    for name, get in COMPARE_ROWS:
        rows.append([name] + [_safe(get, s) for s in summaries])
    sets = sorted({n for s in summaries for n in s.get("metrics", {}).get("pooled", {})})
    for name in sets:
        pooled = [s.get("metrics", {}).get("pooled", {}).get(name, {}) for s in summaries]
        rows.append([f"FID pooled {name}"] + [p.get("fid") for p in pooled])
        rows.append([f"KID pooled {name} (mean +- std)"] + [_kid(p) for p in pooled])
    for s in summaries:
        for who, sets_ in s.get("metrics", {}).items():
            if isinstance(sets_, dict) and "disclosure" in sets_:
                label = f"PSNR x_c {who} (dB)"
                if all(label != r[0] for r in rows):
                    rows.append([label] + [_metric(t, who, "disclosure", "psnr_db") for t in summaries])
    return paths, rows


def _kid(quality: dict) -> str | None:
    if "kid_mean" not in quality:
        return None
    return f"{_fmt(quality['kid_mean'])} +- {_fmt(quality['kid_std'])}"


def _safe(get, s):
    try:
        return get(s)
    except (KeyError, TypeError):
        return None


def _metric(s: dict, who: str, group: str, key: str):
    return s.get("metrics", {}).get(who, {}).get(group, {}).get(key)


def format_compare(paths: list[str], rows: list[list]) -> str:
    header = ["", *paths]
    cells = [header] + [[str(r[0])] + [_fmt(v) for v in r[1:]] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells
    )


def to_json(obj) -> str:
    return json.dumps(obj, indent=2, default=_plain)
