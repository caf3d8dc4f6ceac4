"""The report's figures (``collafuse-hpc report``): the trade-off over c, the conditions
against the baseline, disclosure and client compute, alone / federated / split against
what a client paid, and every run's loss curve.
Each takes the report's aggregated rows and writes one PNG; all need matplotlib
(``pip install 'collafuse-hpc[report]'``) and return False without it."""

from __future__ import annotations

import math

import numpy as np

from collafuse_hpc.report import stats

NAN = float("nan")
# what the parties could learn, drawn over c and against quality: (column, label, marker)
DISCLOSED = (
    ("link_pixel_top1_releases", "linkage top-1 at the run's releases", "D"),
    ("mia_server_auc", "membership AUC, server's model", "^"),
)
SHARE_NAMES = {"on": "labels shared", "off": "labels kept"}  # a condition's share, in words
# a condition's colour: matplotlib's cycle without its grey (C7), kept for what depends on the partition alone
PALETTE = tuple(f"C{k}" for k in range(10) if k != 7)
# per partition: x_c, linkage chance and the client's training, apart from the conditions' colours by shade and line
NEUTRAL = (("black", "-"), ("dimgrey", "--"), ("darkgrey", "-."), ("black", ":"))


def _errorbar(axis, runs: list[dict], key: str, label: str, **style) -> None:
    """``key`` over c with its error bars (:func:`_spread`)."""
    spread = np.array([_spread(r, key) for r in runs]).T
    axis.errorbar([r["c"] for r in runs], [r[key] for r in runs], yerr=spread, capsize=3, label=label, **style)


def _save(plt, fig, path: str, dpi: int, outside: bool = False) -> None:
    """Write ``fig`` to ``path``. An axis whose points sit at one or two x values (one run,
    one c), or on a log axis within one decade, gets its ticks at the points: around a
    single value or in a fraction of a decade matplotlib fills the axis with long tick
    labels that overlap. ``outside``: the image grows to hold a legend beside the axes."""
    from matplotlib.ticker import NullFormatter

    for axis in fig.axes:
        xs = sorted({float(x) for line in axis.get_lines() for x in np.ravel(line.get_xdata()) if np.isfinite(x)})
        if 0 < len(xs) < 3 and axis.get_xscale() == "linear":
            axis.set_xticks(xs)
        elif xs and axis.get_xscale() == "log" and 0 < xs[0] and xs[-1] < 10 * xs[0]:
            lo, hi = np.log(axis.get_xlim())
            ticks = [xs[0]]
            for x in xs[1:]:  # closer labels would overlap, and equal ones say nothing
                if (np.log(x) - np.log(ticks[-1])) / (hi - lo) > 0.15 and f"{x:.2g}" != f"{ticks[-1]:.2g}":
                    ticks.append(x)
            axis.xaxis.set_minor_formatter(NullFormatter())
            axis.set_xticks(ticks, [f"{x:.2g}" for x in ticks])
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, bbox_inches="tight" if outside else None)
    plt.close(fig)


def federated_points(pooled: list[dict]) -> list[tuple[str, float, float]]:
    """(label, membership AUC of the global model, FID) of each pooled federated row: what
    the server and every other client hold, against the quality of the samples that row
    describes (the global model's set for FedAvg, the fine-tuned clients' for +ft)."""
    out = []
    several = len({r.get("partition") for r in pooled}) > 1  # then a point names its partition
    for r in pooled:
        if r["method"] == "split" or math.isnan(r.get("mia_federated_auc", NAN)):
            continue
        fid = r["fid_global"] if not r["method"].endswith("+ft") and not math.isnan(r["fid_global"]) else NAN
        label = f"{r['method']} ({r['partition']})" if several else r["method"]
        out.append((label, r["mia_federated_auc"], r["fid_collaborative"] if math.isnan(fid) else fid))
    return out


def condition_names(rows: list[dict]) -> dict[tuple, str]:
    """{(split, partition, share): its name} for the conditions of ``rows``: the split
    mode, and the partition and whether labels were shared where ``rows`` hold several."""
    conditions = sorted({(r["split"], r["partition"], r["share"]) for r in rows})
    partitions, shares = {c[1] for c in conditions}, {c[2] for c in conditions}
    names = {}
    for split, partition, share in conditions:
        parts = [split] + ([partition] if len(partitions) > 1 else [])
        parts += [SHARE_NAMES.get(share, share)] if len(shares) > 1 else []
        names[(split, partition, share)] = ", ".join(parts)
    return names


def condition_colours(rows: list[dict]) -> dict[tuple, str]:
    """{(split, partition, share): its colour}, by the order of :func:`condition_names`, so
    that one condition has one colour in every figure of a report."""
    return {cond: PALETTE[i % len(PALETTE)] for i, cond in enumerate(condition_names(rows))}


def _first_per_c(rows: list[dict], field: str) -> dict[str, list[dict]]:
    """{value of ``field``: its rows' first row at each c, by c}: for what does not depend
    on the other fields (the rows of one c repeat it, bar measured times)."""
    out: dict[str, dict] = {}
    for r in sorted((r for r in rows if not isinstance(r["c"], str)), key=lambda r: r["c"]):
        out.setdefault(r[field], {}).setdefault(r["c"], r)
    return {value: list(by_c.values()) for value, by_c in sorted(out.items())}


def _shared_lines(pooled: list[dict], psnr_axis, rate_axis, compute_axis) -> None:
    """What depends on a partition's images alone, once per partition over every c its rows
    hold: x_c's PSNR, the linkage chance, the client's training FLOPs and time; and the
    client's ideal share of the sampling grid, once per split mode (the reference split
    hands over later)."""
    by_split = _first_per_c(pooled, "split")
    for k, (split, runs) in enumerate(by_split.items()):
        where = f" ({split})" if len(by_split) > 1 else ""
        compute_axis.plot([r["c"] for r in runs], [r["sampling_ideal_ratio"] for r in runs], color="grey",
                          linestyle=("--", ":", "-.")[k % 3], label=f"sampling, ideal{where}")  # fmt: skip
    by_partition = _first_per_c(pooled, "partition")
    for k, (partition, runs) in enumerate(by_partition.items()):
        sent = [r for r in runs if r["c"] < 1]
        where = f" ({partition})" if len(by_partition) > 1 else ""
        color, line = NEUTRAL[k % len(NEUTRAL)]
        _errorbar(psnr_axis, sent, "psnr_x_c_db", f"x_c as sent{where}", color=color, marker=".", linestyle=line)
        rate_axis.plot([r["c"] for r in runs], [r["chance_top1"] for r in runs], color=color, linestyle=line,
                       linewidth=0.8, label=f"linkage chance{where}")  # fmt: skip
        for key, label, marker in (("train_flops_ratio", "training FLOPs (exact)", "^"),
                                   ("train_time_ratio", "training time", "v")):  # fmt: skip
            compute_axis.plot([r["c"] for r in runs], [r[key] for r in runs], color=color, marker=marker,
                              linestyle=line, label=f"{label}{where}")  # fmt: skip


def tradeoff_figure(pooled: list[dict], path: str, federated: list[dict] = ()) -> bool:
    """Four panels, one line per condition (split mode, and partition and labels shared
    where the rows hold several: :func:`condition_names`) with error bars (:func:`_spread`): over c, quality
    (collaborative against client-alone FID), disclosure (x_c and reconstructions, linkage
    at one release and at the run's releases, membership of the server's model) and client
    compute; then quality against disclosure (the server's membership AUC, the linkage at
    the run's releases), with each pooled ``federated`` row as one point (the global
    model's membership AUC: federated_points). None drawn (False) without a split run."""
    plt = _pyplot()
    if plt is None or not pooled:
        return False
    fig, ax = plt.subplots(1, 4, figsize=(21, 4.6))
    twin = ax[1].twinx()
    names = condition_names(pooled)
    colours = condition_colours(pooled)
    for condition, split in names.items():  # split: the condition's name in the legends
        runs = [r for r in pooled if (r["split"], r["partition"], r["share"]) == condition]
        runs = sorted((r for r in runs if not isinstance(r["c"], str)), key=lambda r: r["c"])
        cs, color = [r["c"] for r in runs], colours[condition]
        _errorbar(ax[0], runs, "fid_collaborative", f"collaborative ({split})", color=color, marker="o")
        _errorbar(ax[0], runs, "fid_client_alone", f"client alone ({split})", color=color, marker="x", linestyle="--")
        _errorbar(
            ax[1], runs, "recon_public_psnr_db", f"reconstruction, public model ({split})", color=color, marker="o"
        )
        _errorbar(twin, runs, "link_pixel_top1", f"linkage top-1 ({split})", color=color, marker="s", linestyle=":")
        sent = [r for r in runs if r["c"] < 1]  # at c = 1 nothing is sent
        for key, label, marker in DISCLOSED:
            _errorbar(twin, sent, key, f"{label} ({split})", color=color, marker=marker, linestyle="-.")
            ax[3].plot([r[key] for r in sent], [r["fid_collaborative"] for r in sent], marker=marker, color=color,
                       label=f"{label} ({split})")  # fmt: skip
        # the client's share of sampling depends on the split (the reference split hands over later)
        ax[2].plot(
            cs, [r["sampling_flops_ratio"] for r in runs], color=color, marker="o", label=f"sampling FLOPs ({split})"
        )
        ax[2].plot(
            cs,
            [r["sampling_time_ratio"] for r in runs],
            color=color,
            marker="x",
            linestyle=":",
            label=f"sampling time ({split})",
        )
    _shared_lines(pooled, ax[1], twin, ax[2])
    ax[0].set(xlabel="cut ratio c (share of steps on the client)", ylabel=fd_label(pooled))
    ax[0].set_title("quality, pooled over clients (lower is better)")
    ax[0].legend(fontsize=7)
    ax[1].set(xlabel="cut ratio c", ylabel="PSNR against x_0 (dB)")
    twin.set(ylabel="linkage top-1 rate, membership AUC", ylim=(0, 1.05))
    ax[1].legend(handles=ax[1].get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0], fontsize=7)
    ax[1].set_title("disclosure: what an adversary holding x_c recovers")
    ax[2].set(xlabel="cut ratio c", ylabel="client / local-only")
    ax[2].set_title("client compute, mean over clients")
    ax[2].legend(fontsize=7)
    for j, (label, auc, fid) in enumerate(federated_points(federated)):
        color = PALETTE[(len(names) + j) % len(PALETTE)]
        ax[3].plot([auc], [fid], marker="*", markersize=11, linestyle="", color=color,
                   label=f"{label}: membership AUC, global model")  # fmt: skip
    ax[3].set(xlabel="disclosure (rate or AUC; 0.5 AUC: chance)", ylabel=ax[0].get_ylabel())
    ax[3].set_title("quality against disclosure, pooled (split: c < 1)")
    ax[3].legend(fontsize=7)
    _save(plt, fig, path, 120)
    return True


def figures_available() -> bool:
    """Whether matplotlib (the optional extra 'report') can draw the figures."""
    return _pyplot() is not None


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


LABEL_BOX = {"fc": "white", "ec": "none", "alpha": 0.8, "pad": 0.5}  # a point's label readable over the lines
LINES = ("-", "--", ":", "-.")  # with matplotlib's 10 colours: 40 runs told apart in the loss figure


def loss_figure(curves: dict[str, dict], path: str) -> bool:
    """Every run's training loss over the rounds (EMA), clients' mean and server: the
    reader sees whether a run stopped before its loss flattened."""
    plt = _pyplot()
    curves = {name: c for name, c in curves.items() if "clients" in c or "server" in c}  # runs that logged a loss
    if plt is None or not curves:
        return False
    fig, ax = plt.subplots(1, 2, figsize=(14, 4.6))
    for i, (name, c) in enumerate(sorted(curves.items())):
        style = {"color": f"C{i % 10}", "linestyle": LINES[i // 10 % len(LINES)], "label": name}
        if "clients" in c:  # c = 0: no client trains; rounds where none took part take the mean
            local = np.nan_to_num(c["clients"], nan=np.nanmean(c["clients"]))
            steps = c.get("steps", 1)  # federated: a round's loss is the mean of E steps; the EMA is per step
            ax[0].plot(c["rounds"] * steps, stats.smooth(local, 0.98**steps), **style)
        if "server" in c:
            ax[1].plot(c["server_rounds"], stats.smooth(c["server"]), **style)
    ax[0].set(
        xlabel="client optimizer steps (rounds; a federated run's rounds x its local steps)",
        ylabel="loss (MSE), EMA 0.98",
        title="clients' local loss, mean over clients",
        yscale="log",
    )
    ax[1].set(xlabel="round", ylabel="loss (MSE), EMA 0.98", title="server loss", yscale="log")
    for axis, none in ((ax[0], "no client trains (c = 0)"), (ax[1], "no server trains (c = 1, federated)")):
        if not axis.lines:  # an empty panel says why, and the legend goes where the runs are
            axis.text(0.5, 0.5, none, ha="center", va="center", transform=axis.transAxes)
    named = dict(sorted({line.get_label(): line for axis in ax for line in axis.lines}.items()))  # c = 0: server only
    # beside the panels, in as many columns as a study's runs need: inside a panel 80 runs ran off the figure
    columns = -(-len(named) // 32)
    fig.legend(named.values(), named.keys(), fontsize=6, loc="center left", bbox_to_anchor=(1, 0.5), ncol=columns)
    _save(plt, fig, path, 110, outside=True)
    return True


def personalization(rows: list[dict]) -> tuple[str, str]:
    """(column, axis label) of the personalization measure of ``rows``: the class distance
    when every row has it (it sees a client's label proportions, which class fidelity
    cannot when clients hold every class), else class fidelity (runs evaluated before the
    class distance existed); the pooled FD when no row has either (no eval.classifier)."""
    if all(not math.isnan(r.get("class_distance", NAN)) for r in rows):
        return "class_distance", "class distance (lower is better)"
    if any(not math.isnan(r.get("fidelity", NAN)) for r in rows):
        return "fidelity", "class fidelity (higher is better)"
    return "fid_collaborative", "FD pooled (lower is better)"


def conditions_figure(table: list[dict], path: str) -> bool:
    """The trade-off per condition (split, partition, labels shared): personalization and FD
    (pooled, and the mean over clients of each client's own) over c, and personalization
    against disclosure (linkage) and client compute; error bars: the 95% interval
    (:func:`_spread`). Personalization: :func:`personalization`."""
    plt = _pyplot()
    rows = [r for r in table if r["who"] == "pooled" and not isinstance(r["c"], str) and not math.isnan(r["fidelity"])]
    if plt is None or not rows:
        return False
    key, name = personalization(rows)
    fig, ax = plt.subplots(1, 4, figsize=(20, 4.6))
    colours = condition_colours([r for r in table if r["who"] == "pooled"])  # as in the trade-off figure
    named: set[tuple] = set()
    for k, (cond, label) in enumerate(condition_names(rows).items()):
        runs = sorted((r for r in rows if (r["split"], r["partition"], r["share"]) == cond), key=lambda r: r["c"])
        color = colours[cond]
        for axis, shown in ((ax[0], key), (ax[1], "fid_collaborative")):
            err = [_spread(r, shown) for r in runs]
            axis.errorbar([r["c"] for r in runs], [r[shown] for r in runs], yerr=np.array(err).T, capsize=3,
                          color=color, marker="o", label=label)  # fmt: skip
        own = [np.mean([t["fid_collaborative"] for t in table if t["who"] != "pooled" and _same(t, r)]) for r in runs]
        ax[1].plot([r["c"] for r in runs], own, color=color, marker="x", linestyle="--", label=f"{label}: per client")
        sent = [r for r in runs if r["c"] < 1]
        for axis, x, shown in ((ax[2], "link_pixel_top1", sent), (ax[3], "sampling_flops_ratio", runs)):
            err = np.array([_spread(r, key) for r in shown]).T
            axis.errorbar([r[x] for r in shown], [r[key] for r in shown], yerr=err, capsize=3, color=color,
                          marker="o", label=label)  # fmt: skip
        for r in runs:  # c = 0 and 1 are one run under every split mode: named once; each condition's
            at = (r["sampling_flops_ratio"], r[key])  # labels sit at their own height beside its points
            if (at, r["c"]) not in named:
                named.add((at, r["c"]))
                ax[3].annotate(f"c={r['c']:g}", at, xytext=(5, 5 - 14 * (k % 4)), textcoords="offset points",
                               fontsize=7, color=color, bbox=LABEL_BOX)  # fmt: skip
    what = "quality" if key == "fid_collaborative" else "personalization"
    ax[0].set(xlabel="cut ratio c", ylabel=name, title=what)
    ax[1].set(xlabel="cut ratio c", ylabel=fd_label(rows), title="FD: pooled (o), clients' own mean (x); lower: better")
    ax[2].set(xlabel="linkage top-1 rate (disclosure)", ylabel=name, title=f"{what} against disclosure")
    ax[3].set(xlabel="client sampling FLOPs / local-only", ylabel=name, title=f"{what} against client compute")
    ax[0].legend(fontsize=7)
    _save(plt, fig, path, 110)
    return True


def method_label(row: dict) -> str:
    """A pooled row's name in the methods figure: alone, split at c (labels kept or shared
    with the server), or FedAvg's variant. Alone sends nothing, so it has one name whichever
    share its partition's split runs used."""
    if row["method"] != "split":
        return row["method"]
    if row["c"] == 1:
        return "alone (c = 1)"
    shared = f", {SHARE_NAMES['on']}" if row.get("share") == "on" else ""
    if row["c"] == 0:  # the same run under every split mode (aggregate() stands it beside each)
        return f"centralized (c = 0){shared}"
    return f"split c = {row['c']:g} ({row['split']}{shared})"


def methods_figure(table: list[dict], path: str) -> bool:
    """Alone, federated and split, one row of panels per partition: personalization
    (:func:`personalization`) against each client's training FLOPs over the run, its
    sampling FLOPs per image and the bytes it moved over the run (log axes), one point
    per method and c, a method in one colour across partitions (squares: FedAvg's global
    models, diamonds: fine-tuned); error bars as in
    :func:`conditions_figure`. Drawn when the report holds a federated run."""
    plt = _pyplot()
    rows = [r for r in table if r["who"] == "pooled" and r["c"] != "mixed"]
    rows = [r for r in rows if not math.isnan(r["fidelity"])] or rows  # the pooled FD only when none has it
    key, name = personalization(rows)
    rows = [r for r in rows if not math.isnan(r[key])]
    if plt is None or not any(r["method"] != "split" for r in rows):
        return False
    # aggregate() stands a c = 1 run beside each share: one point per partition and name
    rows = list({(r["partition"], method_label(r)): r for r in rows}.values())
    partitions = sorted({r["partition"] for r in rows})
    labels = list(dict.fromkeys(method_label(r) for r in rows))  # a method's colour, the same in every row
    palette = [f"C{i}" for i in range(10)] if len(labels) <= 10 else [plt.get_cmap("tab20")(i) for i in range(20)]
    fig, axes = plt.subplots(len(partitions), 3, figsize=(17, 4.8 * len(partitions)), squeeze=False)
    costs = (
        ("train_flops_run", "client training FLOPs over the run", "client training compute"),
        ("sampling_flops_image", "client sampling FLOPs per image", "client sampling compute"),
        ("bytes_run", "bytes a client moved in training rounds", "bytes on the wire"),
    )
    for ax, partition in zip(axes, partitions):
        for r in (r for r in rows if r["partition"] == partition):
            err = np.array([_spread(r, key)]).T
            marker = "D" if r["method"].endswith("+ft") else "s"  # FedAvg's fine-tuned and global models
            if r["method"] == "split":
                marker = "x" if r["c"] == 1 else "o"
            label = method_label(r)
            colour = palette[labels.index(label) % len(palette)]
            style = {"capsize": 3, "marker": marker, "color": colour, "linestyle": "none"}
            drawn = [(axis, r[cost]) for axis, (cost, _, _) in zip(ax, costs) if r[cost] > 0]  # log axes: no 0 or NaN
            for n, (axis, x) in enumerate(drawn):  # (c = 1 moves no bytes, c = 0 trains nothing on a client,
                # eval.compute false counted no FLOPs): labelled once, on the first panel that shows it
                axis.errorbar([x], [r[key]], yerr=err, label=None if n else label, **style)
        where = f" ({partition})" if len(partitions) > 1 else ""
        for axis, (_, xlabel, title) in zip(ax, costs):
            axis.set(xscale="log", xlabel=xlabel, ylabel=name, title=f"quality against {title}{where}")
        shown = [pair for axis in ax for pair in zip(*axis.get_legend_handles_labels())]
        if shown:  # every method, whichever panel showed it first
            ax[0].legend(*zip(*shown), fontsize=7)
    _save(plt, fig, path, 110)
    return True


def fd_label(rows: list[dict]) -> str:
    """The FD axis's label: the features it is measured in, when all rows share them; each
    partition is scored by its own classifier otherwise (its FDs compare within it only)."""
    features = sorted({r["features"] for r in rows})
    if len(features) == 1:  # "classifier-<digest>-test-accuracy-<a>", "pixels", ...: the tables name it whole
        return f"FD ({features[0].split('-', 1)[0]} features)"
    return "FD (each partition's own features: compare within a partition)"


def _spread(row: dict, key: str) -> tuple[float, float]:
    """(below, above) for an error bar: the 95% interval the tables show (over seeds, or
    over images with one seed); without one, the std over seeds; else none."""
    low, high = row.get(f"{key}_low", NAN), row.get(f"{key}_high", NAN)
    if not (math.isnan(low) or math.isnan(high) or math.isnan(row[key])):
        return row[key] - low, high - row[key]
    std = row.get(f"{key}_seed_std", NAN)
    return (std, std) if row["seeds"] > 1 and not math.isnan(std) else (0.0, 0.0)


def _same(a: dict, b: dict) -> bool:
    return all(a[k] == b[k] for k in ("split", "partition", "share", "c"))
