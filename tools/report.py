#!/usr/bin/env python3
"""Sweep and study report: tables and the trade-off figure from several results files.

    python tools/report.py runs/study-*/*/results.h5 --out runs/study-x/report

Writes into --out:
  table.csv     one row per split mode, cut ratio c and client, plus a ``pooled`` row;
                numbers are means over the runs' seeds (``seeds`` counts them) and
                ``<column>_seed_std`` their standard deviation; column names carry their
                units (see COLUMNS): FID and KID per image set, disclosure of x_c and by
                attack, client compute as exact FLOP ratios and measured time ratios
  table.md      the same as three readable tables: quality, disclosure, compute
  tradeoff.png  quality vs disclosure vs client compute over c, one line per split mode,
                error bars over seeds (needs matplotlib: pip install 'collafuse-hpc[report]';
                skipped with a note otherwise)
  grids/        sample grids per run, client and image set (PNG)
  report.html   all of the above in one self-contained page (images embedded, no network)
The pooled row's FID/KID compare all clients' images with all their real images; its
disclosure and compute columns are means over the clients. Runs at c = 0 and c = 1 do
not depend on the split mode: they are shown under every split mode of the report.
Runs without metrics (not evaluated) are listed and left out.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from collafuse_hpc.results.inspection import export, summarize  # noqa: E402
from collafuse_hpc.results.schema import SETS, SUMMARY, role_key  # noqa: E402

NAN = float("nan")
# csv key -> markdown header (with units); FID and KID are in squared units of the features named in
# the ``features`` column (Inception pool_3 for published numbers, pixels in [-1, 1] for the proxy)
COLUMNS = {
    "split": "split",
    "c": "c (client share of steps)",
    "who": "client",
    "seeds": "seeds",
    "rounds": "rounds",
    "features": "features (FID/KID)",
    **{f"fid_{s}": f"FID {s}" for s in SETS},
    **{f"kid_mean_{s}": f"KID {s}" for s in SETS},
    **{f"kid_std_{s}": f"KID std {s}" for s in SETS},
    "t_c": "t_c (step)",
    "snr": "SNR(t_c) (ratio)",
    "psnr_x_c_db": "PSNR x_c vs x_0 (dB)",
    "ssim_x_c": "SSIM x_c vs x_0",
    "mu_gdp_composed": "mu-GDP, all releases",
    "recon_public_psnr_db": "reconstruction PSNR, public model (dB)",
    "recon_public_ssim": "reconstruction SSIM, public model",
    "recon_public_fid": "reconstruction FID, public model",
    "recon_own_psnr_db": "reconstruction PSNR, own model (dB)",
    "link_pixel_top1": "linkage top-1, pixels",
    "link_pixel_top5": "linkage top-5, pixels",
    "link_feature_top1": "linkage top-1, features",
    "chance_top1": "linkage top-1, chance",
    "sampling_flops_ratio": "sampling FLOPs client/local",
    "sampling_time_ratio": "sampling time client/local",
    "sampling_ideal_ratio": "ideal sampling ratio (share of grid)",
    "train_flops_ratio": "training FLOPs client/local",
    "train_time_ratio": "training time client/local",
    "client_images_per_s": "client images/s",
    "server_images_per_s": "server images/s",
}
ATTACK = [key for key in COLUMNS if key.startswith(("recon_", "link_", "chance_"))]
KEYS = ["split", "c", "who", "seeds"]
QUALITY = [*KEYS, *(f"fid_{s}" for s in SETS), *(f"kid_mean_{s}" for s in SETS)]
_ORDER = list(COLUMNS)
DISCLOSURE = [*KEYS, *_ORDER[_ORDER.index("t_c") : _ORDER.index("sampling_flops_ratio")]]
COMPUTE = [*KEYS, *_ORDER[_ORDER.index("sampling_flops_ratio") :]]
TEXT = {"split", "c", "who", "seeds", "features"}  # not averaged over seeds
NUMBERS = [key for key in COLUMNS if key not in TEXT]


def _ratio(a: float | None, b: float | None) -> float:
    return a / b if a is not None and b else NAN


def _client_columns(m: dict, roles: dict, who: str) -> dict:
    d, c, a = m[who]["disclosure"], m[who]["compute"], m[who].get("attack", {})
    return {
        "t_c": d["t_c"],
        "snr": d["snr"],
        "psnr_x_c_db": d["psnr_db"],
        "ssim_x_c": d["ssim"],
        "mu_gdp_composed": d["mu_composed"],
        **{key: a.get(key, NAN) for key in ATTACK},
        "sampling_flops_ratio": _ratio(c["sampling_flops_client"], c["sampling_flops_full"]),
        "sampling_time_ratio": c["sampling_time_ratio"],
        "sampling_ideal_ratio": c["sampling_ideal_ratio"],
        "train_flops_ratio": _ratio(c["train_flops_client"], c["train_flops_full"]),
        "train_time_ratio": c["train_time_ratio"],
        "client_images_per_s": roles.get(role_key(who), {}).get(SUMMARY, {}).get("images_per_s", NAN),
    }


def _mean(values: list) -> float:
    values = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    return sum(values) / len(values) if values else NAN


def rows(summary: dict) -> list[dict]:
    """The rows of one evaluated run: ``pooled`` first, then one per client."""
    m, roles, config = summary["metrics"], summary["roles"], summary["config"]
    clients = [who for who in m if who not in ("attrs", "pooled")]
    cuts = {c.get("cut_ratio") for c in config["clients"]}
    run = {
        "split": config["diffusion"]["split"],
        "c": cuts.pop() if len(cuts) == 1 else "mixed",
        "seed": config["run"]["seed"],
        "rounds": config["run"]["rounds"],
        "features": m["attrs"]["extractor"],
        "server_images_per_s": roles.get(role_key(None), {}).get(SUMMARY, {}).get("images_per_s", NAN),
    }
    per_client = {who: _client_columns(m, roles, who) for who in clients}
    out = []
    for who in ["pooled", *clients]:
        row = {key: NAN for key in COLUMNS} | run | {"who": who}
        for name in SETS:
            q = m[who].get(name, {})
            row[f"fid_{name}"] = q.get("fid", NAN)
            row[f"kid_mean_{name}"] = q.get("kid_mean", NAN)
            row[f"kid_std_{name}"] = q.get("kid_std", NAN)
        if who == "pooled":
            row |= {key: _mean([p[key] for p in per_client.values()]) for key in next(iter(per_client.values()))}
        else:
            row |= per_client[who]
        out.append(row)
    return out


def _std(values: list[float], mean: float) -> float:
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else NAN


def aggregate(table: list[dict]) -> list[dict]:
    """One row per (split, c, client): numbers averaged over the seeds, ``<key>_seed_std``
    their spread. Runs at c = 0 or 1 (the same under every split) count for each split."""
    splits = sorted({r["split"] for r in table})
    groups: dict[tuple, list[dict]] = {}
    for r in table:
        for split in splits if r["c"] in (0, 1) else [r["split"]]:
            groups.setdefault((split, r["c"], r["who"]), []).append(r)
    out = []
    for (split, c, who), runs in groups.items():
        row = {"split": split, "c": c, "who": who, "seeds": len({r["seed"] for r in runs})}
        row["features"] = ", ".join(sorted({r["features"] for r in runs}))
        for key in NUMBERS:
            values = [r[key] for r in runs if isinstance(r[key], (int, float)) and not math.isnan(r[key])]
            row[key] = sum(values) / len(values) if values else NAN
            row[f"{key}_seed_std"] = _std(values, row[key])
        out.append(row)
    out.sort(key=lambda r: (r["split"], isinstance(r["c"], str), r["c"], r["who"] != "pooled", r["who"]))
    return out


def _cell(row: dict, key: str) -> str:
    spread = row.get(f"{key}_seed_std", NAN)
    if row["seeds"] > 1 and not math.isnan(spread):
        return f"{_num(row[key])} ± {_num(spread)}"
    if key.startswith("kid_mean_"):  # one seed: KID's spread over subsets
        std = row[key.replace("mean", "std")]
        return f"{_num(row[key])} ± {_num(std)}" if not math.isnan(row[key]) else "-"
    return _num(row[key])


def _num(v) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4g}"
    return str(v)


SECTIONS = (("Quality", QUALITY), ("Disclosure of x_c and by attack", DISCLOSURE), ("Client compute", COMPUTE))


def _features_note(table: list[dict]) -> str:
    return (
        f"Features for FID/KID: {', '.join(sorted({r['features'] for r in table}))}. With several seeds: mean ± std "
        "over seeds; with one, KID shows mean ± std over subsets (n/a: one subset)."
    )


def write_tables(table: list[dict], out: str) -> str:
    """table.csv and table.md; returns the markdown."""
    with open(os.path.join(out, "table.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, [*COLUMNS, *(f"{key}_seed_std" for key in NUMBERS)])
        w.writeheader()
        w.writerows(table)
    lines = [_features_note(table), ""]
    for title, keys in SECTIONS:
        lines += [f"### {title}", "", "| " + " | ".join(COLUMNS[k] for k in keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_cell(r, k) for k in keys) + " |" for r in table]
        lines.append("")
    text = "\n".join(lines)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text)
    return text


def _png(path: str, alt: str) -> str:
    """An <img> with the PNG embedded, so the page needs no other file and no network."""
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def write_html(table: list[dict], out: str, figure_path: str | None) -> str:
    """report.html: one self-contained page (tables, the trade-off figure, every sample
    grid under ``out``/grids, images embedded) to open in a browser or send by mail."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>collafuse-hpc report</title><style>',
        "body{font-family:sans-serif;margin:2em;max-width:110em} table{border-collapse:collapse;margin:1em 0}",
        "th,td{border:1px solid #bbb;padding:.25em .5em;text-align:right} th{background:#eee}",
        "figure{display:inline-block;margin:.5em} img{image-rendering:pixelated;max-width:100%}",
        "</style></head><body>",
        "<h1>collafuse-hpc report</h1>",
        f"<p>{esc(_features_note(table))}</p>",
    ]
    if figure_path:
        parts += ["<h2>Trade-off over the cut ratio c</h2>", _png(figure_path, "trade-off figure")]
    for title, keys in SECTIONS:
        parts += [f"<h2>{esc(title)}</h2>", "<table>", "<tr>" + "".join(f"<th>{esc(COLUMNS[k])}</th>" for k in keys)]
        parts += ["<tr>" + "".join(f"<td>{esc(_cell(r, k))}</td>" for k in keys) + "</tr>" for r in table]
        parts.append("</table>")
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


def _errorbar(axis, runs: list[dict], key: str, label: str, **style) -> None:
    """``key`` over c with its spread over seeds (none with one seed)."""
    spread = [0 if math.isnan(r[f"{key}_seed_std"]) else r[f"{key}_seed_std"] for r in runs]
    axis.errorbar([r["c"] for r in runs], [r[key] for r in runs], yerr=spread, capsize=3, label=label, **style)


def figure(pooled: list[dict], path: str) -> bool:
    """Three panels over c, one line per split mode with error bars over seeds: quality
    (collaborative against client-alone FID), disclosure (x_c and reconstructions, linkage),
    client compute."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report: matplotlib is not installed, no figure (pip install 'collafuse-hpc[report]')")
        return False
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.6))
    twin = ax[1].twinx()
    splits = sorted({r["split"] for r in pooled})
    for i, split in enumerate(splits):
        runs = [r for r in pooled if r["split"] == split and not isinstance(r["c"], str)]
        cs, color = [r["c"] for r in runs], f"C{i}"
        _errorbar(ax[0], runs, "fid_collaborative", f"collaborative ({split})", color=color, marker="o")
        _errorbar(ax[0], runs, "fid_client_alone", f"client alone ({split})", color=color, marker="x", linestyle="--")
        _errorbar(
            ax[1], runs, "recon_public_psnr_db", f"reconstruction, public model ({split})", color=color, marker="o"
        )
        _errorbar(twin, runs, "link_pixel_top1", f"linkage top-1 ({split})", color=color, marker="s", linestyle=":")
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
        if i == 0:  # x_c, what it discloses and the client's training do not depend on the split mode
            sent = [r for r in runs if r["c"] < 1]  # at c = 1 nothing is sent
            _errorbar(ax[1], sent, "psnr_x_c_db", "x_c as sent", color="grey", marker=".")
            twin.plot(cs, [r["chance_top1"] for r in runs], color="black", linewidth=0.8, label="linkage chance")
            ax[2].plot(
                cs, [r["sampling_ideal_ratio"] for r in runs], color="grey", linestyle="--", label="sampling, ideal (c)"
            )
            ax[2].plot(
                cs, [r["train_flops_ratio"] for r in runs], color="C3", marker="^", label="training FLOPs (exact)"
            )
            ax[2].plot(
                cs, [r["train_time_ratio"] for r in runs], color="C3", marker="v", linestyle=":", label="training time"
            )
    ax[0].set(xlabel="cut ratio c (share of steps on the client)", ylabel=f"FID ({pooled[0]['features']})")
    ax[0].set_title("quality, pooled over clients (lower is better)")
    ax[0].legend(fontsize=7)
    ax[1].set(xlabel="cut ratio c", ylabel="PSNR against x_0 (dB)")
    twin.set(ylabel="linkage top-1 rate", ylim=(0, 1.05))
    ax[1].legend(handles=ax[1].get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0], fontsize=7)
    ax[1].set_title("disclosure: what an adversary holding x_c recovers")
    ax[2].set(xlabel="cut ratio c", ylabel="client / local-only")
    ax[2].set_title("client compute, mean over clients")
    ax[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="results.h5 files of evaluated runs")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--record", type=int, help="the evaluation record to report in every file (default: the newest)")
    args = p.parse_args()
    table = []
    for path in args.results:
        try:
            s = summarize(path, args.record)
        except (OSError, ValueError) as e:
            print(f"report: error: {e}", file=sys.stderr)
            return 2
        if "metrics" not in s:
            print(f"report: {path} has no metrics (run collafuse-hpc evaluate on it); left out")
            continue
        run = rows(s)
        table += run
        folder = os.path.join(args.out, "grids", os.path.basename(os.path.dirname(os.path.abspath(path))))
        export(path, folder, record=args.record)
    if not table:
        print("report: no evaluated runs")
        return 1
    table = aggregate(table)
    os.makedirs(args.out, exist_ok=True)
    print(write_tables(table, args.out))
    drew = figure([r for r in table if r["who"] == "pooled"], os.path.join(args.out, "tradeoff.png"))
    write_html(table, args.out, os.path.join(args.out, "tradeoff.png") if drew else None)
    print(f"report: {args.out}/table.csv, table.md" + (", tradeoff.png" if drew else "") + ", grids/, report.html")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
