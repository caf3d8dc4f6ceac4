"""Reading results files: ``collafuse-hpc inspect``, ``export`` and ``compare``.

Works on the files of finished, running and crashed runs alike: whatever is
missing (a role's part file, its summary, samples, metrics) is listed under
``missing`` instead of failing.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex

import h5py
import numpy as np
import yaml

from collafuse_hpc.atomic import WriteError, check_destination, made_folder, refuse_existing, write_error
from collafuse_hpc.config_rules import describe_keys
from collafuse_hpc.diffusion.split import Cut
from collafuse_hpc.evaluation.attacks import describe as describe_attack
from collafuse_hpc.evaluation.disclosure import describe as describe_disclosure
from collafuse_hpc.evaluation.quality import POOLED_FID
from collafuse_hpc.results.schema import (
    AUDIT,
    CLIENTS,
    METRICS,
    PART_ERRORS,
    ROUND,
    ROUNDS,
    SAMPLES,
    SERVER,
    SETS,
    SUMMARY,
    audit_totals,
    index_path,
    lost_role,
    open_results,
    open_role,
    recent_mean,
    recent_rows,
    record_key,
    record_numbers,
)
from collafuse_hpc.results.writer import save_grid
from collafuse_hpc.roles.federated import SERVER_LR
from collafuse_hpc.runtime.checkpoint import complete_rounds
from collafuse_hpc.runtime.wire import Kind
from collafuse_hpc.tables import cell, format_table


def _plain(value):
    """h5py/numpy attribute values as JSON-friendly Python values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode()
    return value


def _role(g: h5py.Group, record: int | None = None) -> dict:
    """A role's part as a dict; its samples are those of ``record`` (default: the newest)."""
    out: dict = {"attrs": {k: _plain(v) for k, v in g.attrs.items()}}
    rounds = g.get(ROUNDS)
    if rounds is not None and ROUND in rounds:
        out["rounds_logged"] = len(rounds[ROUND])
        out["last_round"] = int(rounds[ROUND][-1]) if len(rounds[ROUND]) else None
        out["tail_rows"] = recent_rows(out["rounds_logged"])
        for name in rounds:
            if name != ROUND:
                mean = recent_mean(rounds[name][-out["tail_rows"] :])
                out.setdefault("tail_means", {})[name] = None if math.isnan(mean) else mean
    for group in (SUMMARY, AUDIT):
        if group in g:
            out[group] = {k: _plain(v) for k, v in g[group].attrs.items()}
    if AUDIT in out:  # a run that did not finish has no total attributes yet, or an earlier invocation's
        kinds = g[AUDIT]["kind"][()] if "kind" in g[AUDIT] else np.zeros(0, np.int64)
        out[AUDIT]["training_messages"] = int((kinds == Kind.TRAIN).sum())
        out[AUDIT]["updates"] = int((kinds == Kind.UPDATE).sum())  # a federated client's
        rows = audit_totals(g)
        out[AUDIT].update({k: max(v, out[AUDIT].get(k, 0)) for k, v in rows.items()})
        out[AUDIT].setdefault("t_c", g.attrs.get("t_c"))
    samples = SAMPLES if record is None else f"{record_key(record, 'samples')}/images"
    if samples in g:
        out["samples"] = list(g[samples].shape)
        out["sampled_with"] = {k: _plain(v) for k, v in g[samples].parent.attrs.items()}
    return out


def history(f: h5py.File) -> list[dict]:
    """Every record of a results file, oldest first ([] for schema v2, which kept none)."""
    out = []
    for n in record_numbers(f):
        a = f[record_key(n)].attrs
        out.append(
            {
                "record": n,
                **{k: _plain(a[k]) for k in ("command", "argv", "started", "finished", "checkpoint_round") if k in a},
                "settings": yaml.safe_load(a.get("settings", "")) or {},
                "ignored": yaml.safe_load(a.get("ignored", "")) or {},  # keys the run's method ignored
                "totals": yaml.safe_load(a.get("totals", "")) or {},
                "has_metrics": METRICS in f[record_key(n)],
            }
        )
    return out


def _metrics_group(f: h5py.File, record: int | None, path: str) -> h5py.Group | None:
    """/metrics (the newest evaluation), or record ``record``'s; ValueError naming the
    records that hold metrics when that one holds none."""
    if record is None:
        return f.get(METRICS)
    key = record_key(record, METRICS)
    if key not in f:
        records = history(f)
        if record not in [h["record"] for h in records]:
            span = f"records {records[0]['record']}..{records[-1]['record']}" if records else "it has no records"
            raise ValueError(f"{path!r}: there is no record {record} ({span}; collafuse-hpc inspect lists them)")
        evaluated = [h["record"] for h in records if h["has_metrics"]]
        command = next(h.get("command", "?") for h in records if h["record"] == record)
        raise ValueError(
            f"{path!r}: record {record} is a {command} record, which holds no metrics; the records of evaluations "
            f"are {evaluated or 'none'} (collafuse-hpc inspect lists them)"
        )
    return f[key]


def run_commands(folder: str) -> dict[str, str]:
    """The commands that act on the run in ``folder``, as typed from where ``folder`` is
    named: what the end of a run and every hint print, so each works as printed."""
    run, results = shlex.quote(folder), shlex.quote(index_path(folder))
    return {
        "evaluate": f"collafuse-hpc evaluate {run}",
        "inspect": f"collafuse-hpc inspect {run}",
        "report": f"collafuse-hpc report {results} --out {shlex.quote(os.path.join(folder, 'report'))}",
    }


def evaluate_command(results: str) -> str:
    """The command that evaluates the run of the results file ``results``."""
    return run_commands(os.path.dirname(results) or ".")["evaluate"]


def summarize(path: str, record: int | None = None) -> dict:
    """Everything a person asks of a results file, as a dict (``inspect --json`` prints it).
    Samples and metrics are the newest, or those of ``record``."""
    out: dict = {"file": path, "missing": []}
    with open_results(path) as f:
        out["history"] = history(f)
        metrics_group = _metrics_group(f, record, path)
        out["attrs"] = {k: _plain(v) for k, v in f.attrs.items() if k not in ("config", "roles")}
        out["config"] = yaml.safe_load(f.attrs.get("config", "{}"))
        roles = yaml.safe_load(f.attrs.get("roles", "{}")) or {}
        out["roles"] = {}
        for key, part in roles.items():
            try:
                role = _role(open_role(f, key), record)
            except PART_ERRORS:
                out["missing"].append(lost_role(f, key, part))
                continue
            out["roles"][key] = role
            if SUMMARY not in role:
                last = role.get("last_round")
                done = f"last round logged {last}" if last is not None else "no round logged"
                out["missing"].append(f"{key}: summary (the run did not finish; {done})")
            if key.startswith(f"{CLIENTS}/") and "samples" not in role:
                out["missing"].append(f"{key}: samples")
        if metrics_group is not None:
            out["metrics"] = {"attrs": {k: _plain(v) for k, v in metrics_group.attrs.items()}}
            for who, g in metrics_group.items():
                order = sorted(g, key=lambda n: SETS.index(n) if n in SETS else len(SETS))
                out["metrics"][who] = {name: {k: _plain(v) for k, v in g[name].attrs.items()} for name in order}
        else:
            out["missing"].append(f"metrics (not evaluated: {evaluate_command(path)})")
    out["checkpoints"] = complete_rounds(os.path.dirname(os.path.abspath(path)))
    out["stale"] = stale_metrics(out)
    return out


def stale_metrics(s: dict) -> str | None:
    """Why the metrics of summary ``s`` do not describe the run as it now is (None when
    they do, or when there are none): it trained on after it was evaluated. The rounds
    trained are the newest complete checkpoint set's, or, for a file moved without its
    checkpoints, the end of the newest training record (the set it started from plus
    the rounds it ran)."""
    scored = s.get("metrics", {}).get("attrs", {}).get("checkpoint_round")
    ends = [h["checkpoint_round"] + h["totals"]["rounds_run"] for h in s["history"] if "rounds_run" in h["totals"]]
    trained = max([*s["checkpoints"], *ends], default=None)
    if scored is None or trained is None or scored >= trained:
        return None
    return (
        f"its metrics are of round {scored}, but the run has since trained to round {trained}: evaluate it again "
        f"({evaluate_command(s['file'])})"
    )


def sampled_steps(steps: int, t_c: int | None, diffusion: dict) -> str:
    """The reverse steps a client's samples took, as they ran: ``diffusion.sampling_steps``
    (0 means T) shared between the server's part of the chain and the client's."""
    try:
        server, client = Cut(t_c, diffusion["timesteps"], diffusion.get("split", "markov"), steps).sampling_grids()
    except (KeyError, TypeError, ValueError):  # no cut or no T recorded: the setting as it was given
        return f"sampling_steps {steps}"
    on_server, on_client = max(0, len(server) - 1), max(0, len(client) - 1)
    if not on_server or not on_client:
        return f"{on_server + on_client} steps, all on the {'client' if on_client else 'server'}"
    return f"{on_server + on_client} steps: {on_server} server + {on_client} client"


def _cuts(cfg: dict) -> list | str:
    """The clients' cut ratios (federated: every client runs the whole chain)."""
    if cfg["run"].get("method", "split") == "federated":
        return "- (whole chain)"
    return sorted({c.get("cut_ratio") for c in cfg["clients"]}, key=str)


def _method(cfg: dict) -> str:
    """``markov split``, or the federated method with its parameters."""
    if cfg.get("run", {}).get("method", "split") == "split":
        return f"{cfg.get('diffusion', {}).get('split')} split"
    f = cfg.get("federated", {})
    tuned = f", fine-tuned {f.get('finetune_steps')} steps" if f.get("finetune_steps") else ""
    lr = f.get("server_lr") or SERVER_LR[f["server_optimizer"]]
    return (
        f"federated: {f.get('server_optimizer')} at server_lr {lr}, {f.get('local_steps')} local "
        f"steps a round, the {f.get('architecture')}'s architecture{tuned}"
    )


def _did(summ: dict) -> str:
    """A role's training summary in a line: what it trained or averaged, its bytes and its
    times. A federated server trains no images itself: its rounds and the updates it averaged."""
    times = ", ".join(f"{k[5:]} {v:.1f} s" for k, v in summ.items() if k.startswith("time_"))
    if "updates" in summ:  # a federated server
        did = f"{summ.get('rounds_run')} rounds, {summ['updates']} updates averaged"
    else:
        did = f"{summ.get('images')} images, {cell(summ.get('images_per_s'))} images/s"
    moved = [f"{summ[k] / 1e6:.2f} MB {k[6:]}" for k in ("bytes_received", "bytes_sent") if k in summ]
    return did + "".join(f", {m}" for m in moved) + f"; {times}"


def format_summary(s: dict) -> str:
    """The summary as readable text."""
    a, cfg = s["attrs"], s["config"] or {}
    lines = [
        f"{s['file']}: {a.get('schema')} v{a.get('schema_version')}, package {a.get('package_version')}, "
        f"torch {a.get('torch_version')}, seed {a.get('seed')}, created {a.get('created')}",
        f"  config: {cfg.get('run', {}).get('rounds')} rounds, T={cfg.get('diffusion', {}).get('timesteps')} "
        f"({cfg.get('diffusion', {}).get('schedule')}, {_method(cfg)}), "
        f"{cfg.get('server', {}).get('count', 1)} server(s), {len(cfg.get('clients', []))} client(s)",
        f"  checkpoint sets: {s['checkpoints'] or 'none'}",
    ]
    if s["history"]:
        lines.append("  history (one record per command that wrote into the run):")
    said: dict = {}  # the ignored keys said last: a record that ignored the same says nothing
    for h in s["history"]:
        done = h.get("finished") or "did not finish"
        changed = ", ".join(f"{k}={v}" for k, v in h["settings"].items())
        totals = ", ".join(f"{k} {v}" for k, v in h["totals"].items())
        line = f"    {h['record']}: {h.get('command')} at {h.get('started')} (finished: {done}), checkpoint round "
        line += f"{h.get('checkpoint_round')}" + (f"; {totals}" if totals else "")
        lines.append(line + (f"; with {changed}" if changed else ""))
        if h["ignored"] and h["ignored"] != said:
            method = cfg.get("run", {}).get("method", "split")
            lines.append(f"       ignored by run.method {method!r}: {describe_keys(h['ignored'])}")
            said = h["ignored"]
    for key, r in s["roles"].items():
        at = r["attrs"]
        cut = f" t_c={at['t_c']} (c={at['cut_ratio']:.2f})" if "t_c" in at else ""
        tail = r.get("tail_means", {})
        if at.get("t_c") == 0:  # c = 0: the client trains no step of its own (c = 1 logs no server loss)
            tail = {k: v for k, v in tail.items() if k != "loss_local"}
        losses = ", ".join(f"{k} {cell(v)}" for k, v in tail.items() if k.startswith("loss"))
        lines.append(
            f"  {key}{cut}: rank {at.get('rank')} on {at.get('host')}, {r.get('rounds_logged', 0)} rounds logged"
        )
        if losses:
            window = f"the last {r['tail_rows']} of {r['rounds_logged']} rounds logged"
            lines.append(f"    losses (mean over the last 10% of the rounds: {window}): {losses}")
        if r.get("summary"):
            lines.append(f"    {_did(r['summary'])}")
        if "audit" in r:
            au = r["audit"]
            lines.append(
                f"    audit: {au.get('images_sent', '?')} images in {au.get('training_messages')} training messages, "
                + (f"{au['updates']} model updates, " if au.get("updates") else "")
                + f"{au.get('bytes_sent', '?')} bytes sent, t_c={au.get('t_c', '?')}"
                + (f"; sends {au['sent']}" if au.get("sent") else "")
            )
        if "samples" in r:
            how = r.get("sampled_with", {})
            made = ""
            if "record" in how:
                steps = sampled_steps(how["sampling_steps"], at.get("t_c"), cfg.get("diffusion", {}))
                eta = f", eta {how['eta']}" if how["sampler"] == "ddim" else ""  # DDPM steps have no eta
                made = f" ({how['sampler']}, {steps}{eta}, record {how['record']})"
            lines.append(f"    samples: {r['samples']} uint8{made}")
    m = s.get("metrics")
    if m:
        lines.append(
            f"  metrics ({m['attrs'].get('extractor')}, checkpoint round {m['attrs'].get('checkpoint_round')}, "
            f"record {m['attrs'].get('record', '-')}):"
        )
        if s.get("stale"):
            lines.append(f"    not the run as it now is: {s['stale']}")
        for who, sets in m.items():
            if who == "attrs":
                continue
            for name, v in sets.items():
                if "fid" in v:
                    lines.append(
                        f"    {who:<10} {name:<14} FID {cell(v['fid'])}  KID {cell(v['kid_mean'])} "
                        f"+- {cell(v['kid_std'])}  ({v['images']} vs {v['real_images']} real)"
                    )
            if "disclosure" in sets:
                lines.append(f"    {who:<10} disclosure: {describe_disclosure(sets['disclosure'])}")
            if "attack" in sets:
                lines.append(f"    {who:<10} attack: {describe_attack(sets['attack'])}")
            if who == "pooled" and any("fid" in v for v in sets.values()):
                lines.append(f"    ({POOLED_FID})")
            if "compute" in sets:
                c = sets["compute"]
                lines.append(
                    f"    {who:<10} client compute: sampling {cell(c['sampling_time_ratio'])} of local-only time "
                    f"(ideal {cell(c['sampling_ideal_ratio'])}), training step {cell(c['train_time_ratio'])}"
                )
    for item in s["missing"]:
        lines.append(f"  missing: {item}")
    return "\n".join(lines)


def export(path: str, out_dir: str, arrays: bool = False, record: int | None = None) -> tuple[list[str], list[str]]:
    """Write each client's samples and each evaluated image set as PNG grids (and
    ``.npy`` arrays with ``arrays``) into ``out_dir``; returns the files written
    (none, and no folder made, when the file holds no images) and one line per client
    whose part file is missing or damaged, whose samples were left out. The newest samples and
    metrics, or those of ``record``."""
    check_destination(out_dir, folder=True)
    images, left_out = {}, []
    samples = SAMPLES if record is None else f"{record_key(record, 'samples')}/images"
    with open_results(path) as f:
        metrics_group = f.get(METRICS) if record is None else f.get(record_key(record, METRICS))
        roles = yaml.safe_load(f.attrs.get("roles", "{}")) or {}
        for key, part in roles.items():
            if not key.startswith(f"{CLIENTS}/"):
                continue
            try:
                g = open_role(f, key)
                if samples in g:
                    images[f"samples_{key.split('/', 1)[1]}"] = g[samples][()]
            except PART_ERRORS:
                left_out.append(lost_role(f, key, part))
        for who, g in (metrics_group or {}).items():
            for name, s in g.items():
                if "images" in s:
                    images[f"{who}_{name}"] = s["images"][()]
    kinds = (".png", ".npy") if arrays else (".png",)
    targets = {os.path.join(out_dir, name + kind): array for name, array in images.items() for kind in kinds}
    refuse_existing(targets, "an earlier export (of this run, another record or another run) would be mixed in")
    if not targets:  # no folder made when there is nothing to export
        return [], left_out
    written = []
    with made_folder(out_dir):
        try:
            for path, array in targets.items():
                written.append(path)
                if path.endswith(".png"):
                    save_grid(array, path)
                else:
                    np.save(path, array)
        except BaseException as e:  # Ctrl-C, a full disk: a partial export would refuse the command run again
            for path in written:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            if isinstance(e, OSError) and not isinstance(e, WriteError):  # PIL and numpy name no file
                raise write_error(e, written[-1]) from e
            raise
    return list(targets), left_out


COMPARE_ROWS = (
    ("extractor (FID/KID features)", lambda s: s["metrics"]["attrs"]["extractor"]),
    ("rounds", lambda s: s["config"]["run"]["rounds"]),
    ("metrics of round", lambda s: f"{s['metrics']['attrs']['checkpoint_round']}" + (" (stale)" if s["stale"] else "")),
    ("method", lambda s: _method(s["config"]).split(":")[0]),
    ("cut ratio(s)", lambda s: _cuts(s["config"])),
    ("server images/s", lambda s: s["roles"].get(SERVER, {}).get("summary", {}).get("images_per_s")),
    ("server loss", lambda s: s["roles"].get(SERVER, {}).get("tail_means", {}).get("loss_server")),
    ("bytes sent", lambda s: sum(r.get("audit", {}).get("bytes_sent", 0) for r in s["roles"].values())),
)


def compare(paths: list[str], record: int | None = None) -> tuple[list[str], list[list], list[str]]:
    """Side-by-side rows (name, value per file) of the headline numbers of ``paths``
    (metrics of the newest evaluation, or of ``record``), and one line per part file
    missing or damaged: the totals of such a file leave its role out."""
    summaries = [summarize(p, record) for p in paths]
    lost = [f"{s['file']}: {m}" for s in summaries for m in s["missing"] if ": part file " in m]
    rows = []
    for name, get in COMPARE_ROWS:
        rows.append([name] + [_safe(get, s) for s in summaries])
    sets = sorted({n for s in summaries for n in s.get("metrics", {}).get("pooled", {}) if n in SETS})
    for name in sets:
        pooled = [s.get("metrics", {}).get("pooled", {}).get(name, {}) for s in summaries]
        rows.append([f"FID pooled {name}"] + [p.get("fid") for p in pooled])
        rows.append([f"KID pooled {name} (mean +- std)"] + [_kid(p) for p in pooled])
    per_client = (  # label, group, key
        ("FID collaborative {}", "collaborative", "fid"),
        ("PSNR x_c {} (dB)", "disclosure", "psnr_db"),
        ("reconstruction PSNR {} (dB, public model)", "attack", "recon_public_psnr_db"),
        ("linkage top-1 {} (pixels)", "attack", "link_pixel_top1"),
    )
    clients = {who for s in summaries for who, g in s.get("metrics", {}).items() if "disclosure" in g}
    for who in sorted(clients):
        for label, group, key in per_client:
            rows.append([label.format(who)] + [_metric(s, who, group, key) for s in summaries])
    return paths, rows, lost


def _kid(quality: dict) -> str | None:
    if "kid_mean" not in quality:
        return None
    return f"{cell(quality['kid_mean'])} +- {cell(quality['kid_std'])}"


def _safe(get, s):
    try:
        return get(s)
    except (KeyError, TypeError):
        return None


def _metric(s: dict, who: str, group: str, key: str):
    return s.get("metrics", {}).get(who, {}).get(group, {}).get(key)


def format_compare(paths: list[str], rows: list[list]) -> str:
    note = f"\n({POOLED_FID})" if any(str(row[0]).startswith("FID pooled") for row in rows) else ""
    return format_table(["", *paths], rows) + note


def to_json(obj) -> str:
    return json.dumps(obj, indent=2, default=_plain)
