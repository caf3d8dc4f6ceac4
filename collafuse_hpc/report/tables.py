"""The report's tables: one row per run and client from a results summary, the rows
averaged over seeds, and table.csv, versus_c1.csv, table.md and report.html.

Column names carry their units (COLUMNS): FID and KID per image set, class fidelity and
distance, precision and recall and the copy rates with their 95% intervals (one seed:
over images; several: the t-interval over the seeds, floored by the images' noise), the
loss still falling, disclosure of x_c and by attack (at one release and at the run's
releases per image, with their intervals where evaluate wrote them), membership
inference against each model another party holds, client compute as exact FLOP ratios
and measured time ratios; and alone, federated and split side by side with quality,
copies, what the other parties could learn and what a client paid. The pooled row's
FID/KID compare all clients' images with all their real images, and its membership
figures every client's candidates under one threshold; its disclosure and compute
columns, copy rates and reconstructions are means over the clients (intervals: the
clients' in quadrature), and its linkage rates pool every client's probes (Wilson's
interval over them).
"""

from __future__ import annotations

import base64
import csv
import html
import math
import os
import re

from collafuse_hpc.evaluation.disclosure import NO_X_C, NOTHING_SENT
from collafuse_hpc.evaluation.privacy import COPY_PERCENTILE, MIA_MODELS
from collafuse_hpc.evaluation.quality import POOLED_FID
from collafuse_hpc.report import stats
from collafuse_hpc.results.schema import SETS, SUMMARY, role_key

NAN = float("nan")
COPIED = (
    f"share nearer a training image than {100 - COPY_PERCENTILE:g}% of held-out images; "
    f"{COPY_PERCENTILE / 100:g}: none copied"
)


def _interval(key: str, header: str) -> dict[str, str]:
    """``key`` and the ends of its 95% interval, ``<key>_low`` and ``<key>_high``: over images
    (evaluate writes it beside the value) for one seed, over seeds for several (aggregate);
    table.csv keeps them, and a cell of table.md shows them beside the value (``_cell``)."""
    return {key: header, f"{key}_low": f"{header}, 95% low", f"{key}_high": f"{header}, 95% high"}


# csv key -> markdown header (with units); FID and KID are in squared units of the features named in
# the ``features`` column (Inception pool_3 for published numbers, pixels in [-1, 1] for the proxy)
COLUMNS = {
    "method": "method (split, or FedAvg's variant)",
    "split": "split",
    "partition": "partition",
    "share": "labels shared",
    "c": "c (client share of steps)",
    "who": "client",
    "seeds": "seeds",
    "rounds": "rounds",
    "features": "features (FID/KID)",
    **{f"fid_{s}": f"FID {s}" for s in SETS},
    **{f"kid_mean_{s}": f"KID {s}" for s in SETS},
    **{f"kid_std_{s}": f"KID std {s}" for s in SETS},
    "fid_collaborative_low": "FD collaborative, 95% low",
    "fid_collaborative_high": "FD collaborative, 95% high",
    **_interval("fidelity", "class fidelity (share in the client's classes)"),
    **_interval("class_distance", "class distance (total variation to the client's label mix; 0 best)"),
    "confidence": "classifier confidence",
    **_interval("precision", "precision"),
    **_interval("recall", "recall"),
    **_interval("copy_rate_pixel", f"copied samples, pixels ({COPIED})"),
    **_interval("copy_rate_feature", f"copied samples, features ({COPIED})"),
    "real_fid_halves": "known answer: FD real vs real (test halves)",
    "real_fidelity": "known answer: class fidelity of real test images",
    "real_class_distance": "known answer: class distance of real test images",
    "loss_change": "loss still falling: last 10% of rounds' drop / whole drop",
    "loss_noise": "its 95% half-width from the rounds' scatter",
    "converged": "converged (drop < 0.02 or within its scatter; share of seeds)",
    "t_c": "t_c (step)",
    "snr": "SNR(t_c) (ratio)",
    "psnr_x_c_db": "PSNR x_c vs x_0 (dB)",
    "ssim_x_c": "SSIM x_c vs x_0",
    "mu_gdp_composed": "mu-GDP, all releases",
    **_interval("recon_public_psnr_db", "reconstruction PSNR, public model (dB)"),
    **_interval("recon_public_ssim", "reconstruction SSIM, public model"),
    **_interval("recon_public_fid", "reconstruction FID, public model"),
    **_interval("recon_own_psnr_db", "reconstruction PSNR, own model (dB)"),
    **_interval("link_pixel_top1", "linkage top-1, pixels"),
    **_interval("link_pixel_top5", "linkage top-5, pixels"),
    **_interval("link_feature_top1", "linkage top-1, features"),
    "chance_top1": "linkage top-1, chance",
    "releases": "releases per image (k)",
    **_interval(
        "link_pixel_top1_releases", "linkage top-1 at the run's releases, pixels (grouping known: upper bound)"
    ),
    **_interval("link_feature_top1_releases", "linkage top-1 at the run's releases, features"),
    **_interval("recon_public_psnr_db_releases", "reconstruction PSNR at the run's releases, public model (dB)"),
    **{
        f"mia_{model}_{figure}{end}": f"membership {name}, {model}'s model{what}"
        for model in MIA_MODELS
        for figure, name in (("auc", "AUC (0.5: chance)"), ("tpr_at_1fpr", "TPR at 1% FPR (0.01: chance)"))
        for end, what in (("", ""), ("_low", ", 95% low"), ("_high", ", 95% high"))
    },
    "sampling_flops_ratio": "sampling FLOPs client/local",
    "sampling_time_ratio": "sampling time client/local",
    "sampling_ideal_ratio": "ideal sampling ratio (share of grid)",
    "train_flops_ratio": "training FLOPs client/local",
    "train_time_ratio": "training time client/local",
    "client_images_per_s": "client images/s",
    "train_flops_round": "client training FLOPs per round",
    "train_flops_run": "client training FLOPs over the run (fine-tuning included)",
    "sampling_flops_image": "client sampling FLOPs per image",
    "bytes_run": "bytes a client sent and received over the run's training rounds",
    "server_images_per_s": "server images/s",
    "images": "images scored (generated, per set)",  # last: table.csv's earlier columns keep their places
    "real_images": "real held-out images scored",
}
ATTACK = [key for key in COLUMNS if key.startswith(("recon_", "link_", "chance_"))]  # with their intervals' ends
MIA = [key for key in COLUMNS if key.startswith("mia_")]  # with their intervals' ends
COPIES = ["copy_rate_pixel", "copy_rate_feature"]
KEYS = ["method", "split", "partition", "share", "c", "who", "seeds"]
FIDELITY = ["fidelity", "class_distance", "confidence", "precision", "recall", *COPIES]
FIDELITY += ["real_fid_halves", "real_fidelity", "real_class_distance", "loss_change", "loss_noise", "converged"]
QUALITY = [*KEYS, *(f"fid_{s}" for s in SETS), *(f"kid_mean_{s}" for s in SETS), *FIDELITY]
_ORDER = list(COLUMNS)
ENDS = ("_low", "_high")  # a cell shows its interval's ends beside its value: no column of their own in table.md
DISCLOSURE = [*KEYS, *(key for key in _ORDER[_ORDER.index("t_c") : _ORDER.index(MIA[0])] if not key.endswith(ENDS))]
MEMBERSHIP = [*KEYS, *(key for key in MIA if not key.endswith(ENDS))]
# the classes' numbers are each client's own (its label mix), and so are its copies and the attacks on its x_c:
# pooled, they are the mean over clients, and the intervals of those means come from the clients' intervals
# (stats.pooled_interval); a linkage rate pools its clients' probes (stats.pooled_share)
POOLED_MEANS = ["confidence", "real_fidelity", "real_class_distance", "real_fid_halves"]
POOLED_INTERVALS = ["fidelity", "class_distance", *COPIES, *(key for key in ATTACK if f"{key}_low" in COLUMNS)]
COMPUTE = [*KEYS, *_ORDER[_ORDER.index("sampling_flops_ratio") : _ORDER.index("train_flops_round")]]
COSTS = ["train_flops_round", "train_flops_run", "sampling_flops_image", "bytes_run"]
# alone (c = 1), federated and split side by side: quality, copies, what the other parties could learn (the
# model they hold, each image's releases) and what each client paid for it
METHODS = ["method", "partition", "c", "who", "seeds", "fidelity", "class_distance", "fid_collaborative"]
METHODS += ["precision", "recall", *COPIES, "mia_server_auc", "mia_federated_auc", "releases"]
METHODS += ["link_pixel_top1_releases", "link_feature_top1_releases", *COSTS]
TEXT = {"method", "split", "partition", "share", "c", "who", "seeds", "features"}  # not averaged over seeds
NUMBERS = [key for key in COLUMNS if key not in TEXT]
INTERVALS = [key for key in NUMBERS if f"{key}_low" in COLUMNS]  # the figures with a 95% interval
SPREADS = [key for key in NUMBERS if not key.endswith(("_low", "_high"))]  # means, with <key>_seed_std over seeds


def _ratio(a: float | None, b: float | None) -> float:
    return a / b if a is not None and b else NAN


def _client_columns(m: dict, roles: dict, who: str, config: dict) -> dict:
    d, c, a = m[who]["disclosure"], m[who].get("compute", {}), m[who].get("attack", {})  # compute: eval.compute
    client = next((cc for cc in config["clients"] if cc.get("id") == who), {})
    federated = config["run"].get("method", "split") == "federated"
    steps = config.get("federated", {}).get("local_steps", 1) if federated else 1  # batches a client trains a round
    rounds = config["run"]["rounds"]
    summary = roles.get(role_key(who), {}).get(SUMMARY, {})
    return {
        "t_c": d["t_c"],
        "snr": d["snr"],
        "psnr_x_c_db": d["psnr_db"],
        "ssim_x_c": d["ssim"],
        "mu_gdp_composed": d["mu_composed"],
        "releases": a.get("releases", NAN),
        **{key: a.get(key, NAN) for key in ATTACK},
        "sampling_flops_ratio": _ratio(c.get("sampling_flops_client"), c.get("sampling_flops_full")),
        "sampling_time_ratio": c.get("sampling_time_ratio", NAN),
        "sampling_ideal_ratio": c.get("sampling_ideal_ratio", NAN),
        "train_flops_ratio": _ratio(c.get("train_flops_client"), c.get("train_flops_full")),
        "train_time_ratio": c.get("train_time_ratio", NAN),
        "client_images_per_s": summary.get("images_per_s", NAN),
        "train_flops_round": c.get("train_flops_client", NAN) * client.get("batch_size", NAN) * steps,
        "train_flops_run": c.get("train_flops_client", NAN) * client.get("batch_size", NAN) * steps * rounds,
        "sampling_flops_image": c.get("sampling_flops_client", NAN),
        "bytes_run": summary.get("bytes_sent", NAN) + summary.get("bytes_received", NAN),
    }


def _mean(values: list) -> float:
    values = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    return sum(values) / len(values) if values else NAN


def _quality_columns(m: dict, who: str, name: str = "collaborative") -> dict:
    """The numbers of the set ``name`` that a client samples with (collaborative; a federated
    run's global model: global) under the collaborative set's columns; the classifier's are
    NaN with other features."""
    q, real = m[who].get(name, {}), m[who].get("real", {})
    out = {key: q.get(key, NAN) for key in ("precision", "recall", "confidence", "class_distance", *COPIES)}
    out["fid_collaborative"], out["kid_mean_collaborative"] = q.get("fid", NAN), q.get("kid_mean", NAN)
    out["kid_std_collaborative"] = q.get("kid_std", NAN)
    out["fidelity"] = q.get("class_fidelity", NAN)
    for end in ("low", "high"):
        out[f"fidelity_{end}"] = q.get(f"class_fidelity_{end}", NAN)
        out[f"fid_collaborative_{end}"] = q.get(f"fid_{end}", NAN)
        out |= {
            f"{key}_{end}": q.get(f"{key}_{end}", NAN) for key in ("precision", "recall", "class_distance", *COPIES)
        }
    out["real_fid_halves"], out["real_fidelity"] = real.get("fid_real_halves", NAN), real.get("class_fidelity", NAN)
    out["real_class_distance"] = real.get("class_distance", NAN)
    return out


def _range(key: str) -> tuple[float, float]:
    """Where an interval of ``key`` (pooled over clients, or over seeds) is clipped: an FD
    or a reconstruction's PSNR, SSIM or FID has its own range; every other figure with an
    interval is a share (a rate, an AUC)."""
    name = key.removesuffix("_releases")
    if name.startswith("fid_") or name.endswith("_fid"):
        return 0.0, math.inf
    ranges = {"_psnr_db": (-math.inf, math.inf), "_ssim": (-1.0, 1.0)}
    return next((r for end, r in ranges.items() if name.endswith(end)), (0.0, 1.0))


def _membership(figures: dict, model: str) -> dict:
    """The membership columns of a row whose clients sample with ``model``: their own
    (``client``: split, fine-tuned) or FedAvg's global model (``federated``). The client's
    model columns are the figures of that model: a FedAvg global row showed the fine-tuned
    model's, which its clients do not sample with and no other party holds. Pooled: every
    client's candidates under one threshold."""
    return {key: figures.get(key.replace("mia_client_", f"mia_{model}_"), NAN) for key in MIA}


def _convergence(curves: dict) -> dict:
    """The loss still falling of the role (clients' mean, server) that falls most, its
    scatter, and whether every role has converged (1.0 or 0.0: averaged over seeds, a share)."""
    roles = [curves[role] for role in ("clients", "server") if role in curves]
    steps = curves.get("steps", 1)  # a federated round's loss is the mean of E local steps
    change, noise = max((stats.loss_change(r, steps), stats.loss_change_noise(r, steps)) for r in roles)
    done = NAN if math.isnan(change) else float(all(stats.converged(r, steps) for r in roles))  # NaN: under 100 steps
    return {"loss_change": change, "loss_noise": noise, "converged": done}


def method_of(config: dict) -> str:
    """``split``, or the federated run's variant: ``fedavg`` with ``-small`` (the clients'
    architecture) and ``-cond`` (class-conditional on local labels) as they apply; its
    fine-tuned clients' rows add ``+ft`` (rows)."""
    if config["run"].get("method", "split") == "split":
        return "split"
    small = "-small" if config.get("federated", {}).get("architecture") == "client" else ""
    return "fedavg" + small + ("-cond" if any(c.get("labels") for c in config["clients"]) else "")


def rows(summary: dict, curves: dict) -> list[dict]:
    """The rows of one evaluated run (its ``curves``: stats.loss_curves): ``pooled``
    first, then one per client; a fine-tuned federated run's of its global model, then
    those of its fine-tuned clients (method ``+ft``)."""
    m, roles, config = summary["metrics"], summary["roles"], summary["config"]
    clients = [who for who in m if who not in ("attrs", "pooled")]
    cuts = {c.get("cut_ratio") for c in config["clients"]}
    method = method_of(config)
    split = method == "split"
    run = {
        "method": method,
        "split": config["diffusion"]["split"] if split else "-",
        "partition": m["attrs"].get("partition", "-"),
        "share": ("on" if any(c.get("share_labels") for c in config["clients"]) else "off") if split else "-",
        **_convergence(curves),
        "c": (cuts.pop() if len(cuts) == 1 else "mixed") if split else "-",
        "seed": config["run"]["seed"],
        "rounds": config["run"]["rounds"],
        "features": m["attrs"]["extractor"],
        "server_images_per_s": roles.get(role_key(None), {}).get(SUMMARY, {}).get("images_per_s", NAN),
    }
    per_client = {who: _client_columns(m, roles, who, config) for who in clients}
    # (label, image set, the model its clients sample with): a fine-tuned federated run is two points, its global
    # model's samples (when scored: eval.sets' global) and its clients' fine-tuned ones, which are its collaborative
    # set whether or not the global one was scored; without fine-tuning a federated client samples with the global
    variants = [(method, "collaborative", "client" if split else "federated")]
    if not split and config.get("federated", {}).get("finetune_steps", 0) > 0:
        variants = [(method, "global", "federated")] if "global" in m["pooled"] else []
        variants.append((f"{method}+ft", "collaborative", "client"))
    out = []
    for (label, scored, model), who in ((v, who) for v in variants for who in ["pooled", *clients]):
        row = {key: NAN for key in COLUMNS} | run | {"who": who, "method": label}
        for name in SETS:
            q = m[who].get(name, {})
            row[f"fid_{name}"] = q.get("fid", NAN)
            row[f"kid_mean_{name}"] = q.get("kid_mean", NAN)
            row[f"kid_std_{name}"] = q.get("kid_std", NAN)
        row |= _quality_columns(m, who, scored)
        row["images"] = m[who].get(scored, {}).get("images", NAN)
        row["real_images"] = m[who].get(scored, {}).get("real_images", NAN)
        if who == "pooled":  # class fidelity and distance pooled: the mean over clients (each weighs the same)
            row |= {key: _mean([p[key] for p in per_client.values()]) for key in next(iter(per_client.values()))}
            own = [_quality_columns(m, c, scored) | per_client[c] for c in clients]
            row |= {key: _mean([q[key] for q in own]) for key in POOLED_MEANS}
            probes = [m[c].get("attack", {}).get("link_candidates", NAN) for c in clients]
            for key in POOLED_INTERVALS:
                value, low, high = ([q[f"{key}{end}"] for q in own] for end in ("", *ENDS))
                if key.startswith("link_"):  # a share of probes: pooled over every client's
                    row[key], row[f"{key}_low"], row[f"{key}_high"] = stats.pooled_share(value, low, probes)
                else:
                    row[key], row[f"{key}_low"], row[f"{key}_high"] = stats.pooled_interval(
                        value, low, high, bounds=_range(key)
                    )
        else:
            row |= per_client[who]
        row |= _membership(m[who].get("membership", {}), model)
        if label.endswith("+ft"):  # and each client's F fine-tuning steps, one batch each
            f = config["federated"]
            row["train_flops_run"] += f["finetune_steps"] * row["train_flops_round"] / f["local_steps"]
        out.append(row)
    return out


def _std(values: list[float], mean: float) -> float:
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else NAN


def _seeds_interval(runs: list[dict], key: str, mean: float) -> dict[str, float]:
    """``<key>_low`` and ``<key>_high`` of ``mean``, the mean of ``key`` over several seeds'
    ``runs``: stats.seeds_half's interval clipped to the figure's range; NaN where fewer
    than two seeds have a value or it cannot be told (an infinite PSNR)."""
    scored = [r for r in runs if isinstance(r[key], (int, float)) and not math.isnan(r[key])]
    half = math.nan
    if len(scored) > 1:
        half, _ = stats.seeds_half([r[key] for r in scored], [stats.image_half(r, key) for r in scored])
    if math.isnan(half):
        return {f"{key}_low": NAN, f"{key}_high": NAN}
    low, high = _range(key)
    return {f"{key}_low": max(low, mean - half), f"{key}_high": min(high, mean + half)}


def aggregate(table: list[dict]) -> list[dict]:
    """One row per (split, c, client): numbers averaged over the seeds, ``<key>_seed_std``
    their spread, and over several seeds a figure's 95% interval the t-interval over them,
    never narrower than the images' noise of the mean (stats.seeds_half; over one seed,
    its interval over images). Runs at c = 0 or 1 (the same under every split) stand
    beside each split mode their partition was run with (at some 0 < c < 1; its own split
    when none was)."""
    partitions = {r["partition"] for r in table}
    split_runs = [r for r in table if r["method"] == "split"]
    shares = {p: sorted({r["share"] for r in split_runs if r["partition"] == p}) for p in partitions}
    cut = [r for r in table if r["method"] == "split" and r["c"] not in (0, 1)]  # runs that depend on the split mode
    splits = {p: sorted({r["split"] for r in cut if r["partition"] == p}) for p in partitions}
    groups: dict[tuple, list[dict]] = {}
    for r in table:
        for split in (splits[r["partition"]] or [r["split"]]) if r["c"] in (0, 1) else [r["split"]]:
            # c = 1 sends nothing, labels neither: it stands beside each share its partition was run with
            for share in shares[r["partition"]] if r["c"] == 1 else [r["share"]]:
                groups.setdefault((r["method"], split, r["partition"], share, r["c"], r["who"]), []).append(r)
    out = []
    for (method, split, partition, share, c, who), runs in groups.items():
        row = {"method": method, "split": split, "partition": partition, "share": share, "c": c, "who": who}
        row["seeds"] = len({r["seed"] for r in runs})
        row["features"] = ", ".join(sorted({r["features"] for r in runs}))
        for key in SPREADS:
            values = [r[key] for r in runs if isinstance(r[key], (int, float)) and not math.isnan(r[key])]
            row[key] = sum(values) / len(values) if values else NAN
            row[f"{key}_seed_std"] = _std(values, row[key])
        for key in INTERVALS:  # one seed: its own interval over images
            one = {f"{key}{end}": runs[0][f"{key}{end}"] for end in ("_low", "_high")}
            row |= _seeds_interval(runs, key, row[key]) if len(runs) > 1 else one
        out.append(row)
    out.sort(
        key=lambda r: (
            r["method"] != "split",
            r["method"],
            r["split"],
            r["partition"],
            r["share"],
            isinstance(r["c"], str),
            r["c"],
            r["who"] != "pooled",
            r["who"],
        )
    )
    return out


def _absent(row: dict, key: str) -> str | None:
    """Why a disclosure or attack column of ``row`` holds no number: the clients sent
    nothing (no release: c = 1), or no other client's model could serve as the public one."""
    if (key in DISCLOSURE[len(KEYS) :] or key.startswith("mia_server_")) and row.get("mu_gdp_composed") == 0:
        return NOTHING_SENT if row["method"] == "split" else NO_X_C
    return "no public model" if key.startswith("recon_public_") else None


def _cell(row: dict, key: str) -> str:
    if isinstance(row[key], float) and math.isnan(row[key]) and _absent(row, key):
        return _absent(row, key)
    low, high = row.get(f"{key}_low", NAN), row.get(f"{key}_high", NAN)
    if not (math.isnan(low) or math.isnan(high) or math.isnan(row[key])):  # over seeds, or one seed's over images
        return f"{_num(row[key])} [{_num(low)}, {_num(high)}]"
    spread = row.get(f"{key}_seed_std", NAN)
    if row["seeds"] > 1 and not math.isnan(spread):
        return f"{_num(row[key])} ± {_num(spread)}"
    if key in SPREADS and row["seeds"] > 1 and math.isfinite(row[key]):  # a mean that one seed alone scored
        return f"{_num(row[key])} (1 of {row['seeds']} seeds)"
    if key.startswith("kid_mean_"):  # one seed: KID's spread over subsets
        std = row[key.replace("mean", "std")]
        return f"{_num(row[key])} ± {_num(std)}" if not math.isnan(row[key]) else "-"
    return _num(row[key])


def _span(counts: set[float]) -> str:
    """``72``, or ``36 to 72`` where runs or clients scored different numbers."""
    return f"{min(counts):.0f}" if len(counts) == 1 else f"{min(counts):.0f} to {max(counts):.0f}"


def _num(v) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4g}"
    return str(v)


SECTIONS = (
    ("Quality", QUALITY),
    ("Disclosure of x_c and by attack", DISCLOSURE),
    ("Membership inference against the models other parties hold", MEMBERSHIP),
    ("Client compute", COMPUTE),
    (
        "Alone (c = 1), federated and split: quality, copies, what other parties could learn, what a client paid",
        METHODS,
    ),
)
VERSUS = ("method", "split", "partition", "share", "c", "who", "metric", "seeds", "delta", "low", "high", "interval")
VERSUS += ("verdict",)
VERSUS += ("unpaired",)  # the point's seeds without a c = 1 run of their partition and seed: not in the difference


def _note(table: list[dict], why_empty: str, sections: list[tuple[str, list[str], list[list[str]]]]) -> str:
    """What the tables' cells hold, said only of what they show (the legend of report.html and
    table.md), and ``why_empty``: why versus_c1.csv has no rows ("" when it has)."""
    one_seed = any(r["seeds"] == 1 for r in table)
    cells = " ".join(c for _, _, rows in sections for row in rows for c in row)
    out = [f"Features for FID/KID: {', '.join(sorted({r['features'] for r in table}))}."]
    clients = [r for r in table if r["who"] != "pooled"]
    made, real = ({r[key] for r in clients if not math.isnan(r[key])} for key in ("images", "real_images"))
    if made and real:
        out.append(
            f"Images scored per client and run: {_span(made)} generated (eval.images) against {_span(real)} real "
            "held-out test images (the client's test split, at most eval.images); a pooled row pools the clients'."
        )
    several = [r for r in table if r["seeds"] > 1]
    if any(not math.isnan(r[f"{key}_low"]) for r in several for key in INTERVALS):
        out.append(
            "With several seeds, [a, b] is the 95% t-interval over the seeds, never narrower than the images' noise "
            "of the mean (each seed's interval over images, in quadrature, over their number); a cell without one, "
            "mean ± std over seeds."
        )
    elif several:
        out.append("With several seeds: mean ± std over seeds.")
    if one_seed and re.search(r"\[[^]]+, [^]]+\]", cells):
        out.append(
            "With one seed, [a, b] is the 95% interval over images: bootstrap, but Wilson's for a linkage rate over "
            "its probes and the span of both for a copy rate (membership: bootstrap over candidates); a pooled "
            "row's combines the clients' (a linkage rate's: Wilson's over every client's probes)."
        )
    elif one_seed:
        out.append("No intervals over images: they come with eval.extractor: classifier and eval.bootstrap.")
    if one_seed and any(h.startswith("KID ") for _, header, _ in sections for h in header):
        out.append("KID of one seed: mean ± std over subsets (n/a: one subset).")
    headers = {h for _, header, _ in sections for h in header}
    if any(h.startswith("membership ") for h in headers):
        out.append(
            "Membership: the loss attack on the client's training images against as many held-out ones (pooled: "
            "every client's, one threshold)."
        )
        if any(r["method"] != "split" for r in table):
            out.append(
                "A FedAvg row's client's model is the one its clients sample with: the global model (federated's "
                "model, which the server and every other client hold), or with +ft the fine-tuned one."
            )
    if COLUMNS["link_pixel_top1_releases"] in headers:
        out.append(
            "At the run's releases: each image's k releases averaged by an adversary told which they are (an upper "
            "bound)."
        )
    if why_empty:
        out.append(f"versus_c1.csv has no rows: {why_empty}.")
    if any(r["who"] == "pooled" for r in table):
        out.append(f"FID/FD {POOLED_FID}.")
    return " ".join(out)


EMPTY = ("n/a", "-")  # cells that hold no number


def _sections(table: list[dict], versus: list[dict]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows of cells) of every table of the report. A column no row holds a
    number for is left out (the classifier's with other features): table.csv has them all."""
    out = []
    federated = any(r["method"] != "split" for r in table)
    for title, keys in SECTIONS:
        if keys is METHODS and not federated:  # without a federated run it repeats the quality table
            continue
        cells = [[_cell(r, k) for k in keys] for r in table]
        shown = [i for i, k in enumerate(keys) if k in KEYS or any(row[i] not in EMPTY for row in cells)]
        out.append((title, [COLUMNS[keys[i]] for i in shown], [[row[i] for i in shown] for row in cells]))
    if versus:
        title = (
            "Against each client training alone (c = 1): difference and its 95% interval (over paired seeds, "
            "at least as wide as the images' sampling noise; with one seed over images)"
        )
        out.append((title, list(VERSUS), [[_num(v[k]) for k in VERSUS] for v in versus]))
    return out


def write_tables(table: list[dict], versus: list[dict], out: str, notes: list[str], why_empty: str) -> str:
    """table.csv, versus_c1.csv and table.md (``notes``: what was left out and why, under
    its own heading; ``why_empty``: why ``versus`` has no rows); returns the markdown."""
    with open(os.path.join(out, "table.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, [*COLUMNS, *(f"{key}_seed_std" for key in SPREADS)])
        w.writeheader()
        w.writerows(table)
    with open(os.path.join(out, "versus_c1.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, VERSUS)
        w.writeheader()
        w.writerows(versus)
    sections = _sections(table, versus)
    lines = [_note(table, why_empty, sections), ""]
    for title, header, cells in sections:
        lines += [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        lines.append("")
    if notes:
        lines += ["### Left out", "", *(f"- {note}" for note in notes), ""]
    text = "\n".join(lines)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text)
    return text


def _png(path: str, alt: str) -> str:
    """An <img> with the PNG embedded, so the page needs no other file and no network."""
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def write_html(
    table: list[dict], versus: list[dict], out: str, figures: list[tuple[str, str]], notes: list[str], why_empty: str
) -> str:
    """report.html: one self-contained page (tables, the figures ``[(title, path)]``, every
    sample grid under ``out``/grids, images embedded) to open in a browser or send by mail;
    ``notes`` and ``why_empty`` as in :func:`write_tables`."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>collafuse-hpc report</title><style>',
        "body{font-family:sans-serif;margin:2em;max-width:110em} table{border-collapse:collapse;margin:1em 0}",
        "th,td{border:1px solid #bbb;padding:.25em .5em;text-align:right} th{background:#eee}",
        "figure{display:inline-block;margin:.5em} img{image-rendering:pixelated;max-width:100%}",
        "</style></head><body>",
        "<h1>collafuse-hpc report</h1>",
    ]
    sections = _sections(table, versus)
    parts.append(f"<p>{esc(_note(table, why_empty, sections))}</p>")
    for title, path in figures:
        parts += [f"<h2>{esc(title)}</h2>", _png(path, title)]
    for title, header, cells in sections:
        parts += [f"<h2>{esc(title)}</h2>", "<table>", "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header)]
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in cells]
        parts.append("</table>")
    if notes:
        parts += ["<h2>Left out</h2>", "<ul>", *(f"<li>{esc(note)}</li>" for note in notes), "</ul>"]
    grids = os.path.join(out, "grids")
    parts.append("<h2>Samples</h2>")
    for run in sorted(os.listdir(grids)) if os.path.isdir(grids) else []:
        parts.append(f"<h3>{esc(run)}</h3>")
        for name in sorted(n for n in os.listdir(os.path.join(grids, run)) if n.endswith(".png")):
            caption = f"{run}: {name[:-4]}"
            parts.append(f"<figure>{_png(os.path.join(grids, run, name), caption)}<figcaption>{esc(name[:-4])}")
            parts.append("</figcaption></figure>")
    parts.append("</body></html>")
    path = os.path.join(out, "report.html")
    with open(path, "w") as f:
        f.write("\n".join(parts) + "\n")
    return path
