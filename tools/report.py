#!/usr/bin/env python3
"""Sweep report: tables and the trade-off figure from several results files.

    python tools/report.py runs/sweep-*/c*/results.h5 --out runs/sweep-x/report

Writes into --out:
  table.csv     one row per run and client, plus a ``pooled`` row per run (sorted by
                cut ratio c); the column names carry their units (see COLUMNS):
                FID and KID (mean, std) per image set, disclosure of x_c, client
                compute as exact FLOP ratios and measured time ratios, images/s
  table.md      the same as two readable tables: quality, then disclosure and compute
  tradeoff.png  quality vs disclosure vs client compute over c, pooled rows (needs
                matplotlib: pip install 'collafuse-hpc[report]'; skipped with a note otherwise)
  grids/        sample grids per run, client and image set (PNG)
The pooled row's FID/KID compare all clients' images with all their real images;
its disclosure and compute columns are means over the clients. Runs without
metrics (not evaluated) are listed and left out.
"""

from __future__ import annotations

import argparse
import csv
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
    "c": "c (client share of steps)",
    "who": "client",
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
    "sampling_flops_ratio": "sampling FLOPs client/local",
    "sampling_time_ratio": "sampling time client/local",
    "sampling_ideal_ratio": "ideal sampling ratio (share of grid)",
    "train_flops_ratio": "training FLOPs client/local",
    "train_time_ratio": "training time client/local",
    "client_images_per_s": "client images/s",
    "server_images_per_s": "server images/s",
}
QUALITY = ["c", "who", *(f"fid_{s}" for s in SETS), *(f"kid_mean_{s}" for s in SETS)]
DISCLOSURE = ["c", "who", *list(COLUMNS)[list(COLUMNS).index("t_c") :]]


def _mean(values: list) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else NAN


def _ratio(a: float | None, b: float | None) -> float:
    return a / b if a is not None and b else NAN


def _client_columns(m: dict, roles: dict, who: str) -> dict:
    d, c = m[who]["disclosure"], m[who]["compute"]
    return {
        "t_c": d["t_c"],
        "snr": d["snr"],
        "psnr_x_c_db": d["psnr_db"],
        "ssim_x_c": d["ssim"],
        "mu_gdp_composed": d["mu_composed"],
        "sampling_flops_ratio": _ratio(c["sampling_flops_client"], c["sampling_flops_full"]),
        "sampling_time_ratio": c["sampling_time_ratio"],
        "sampling_ideal_ratio": c["sampling_ideal_ratio"],
        "train_flops_ratio": _ratio(c["train_flops_client"], c["train_flops_full"]),
        "train_time_ratio": c["train_time_ratio"],
        "client_images_per_s": roles.get(role_key(who), {}).get(SUMMARY, {}).get("images_per_s", NAN),
    }


def rows(summary: dict) -> list[dict]:
    """The rows of one evaluated run: ``pooled`` first, then one per client."""
    m, roles = summary["metrics"], summary["roles"]
    clients = [who for who in m if who not in ("attrs", "pooled")]
    cuts = {c.get("cut_ratio") for c in summary["config"]["clients"]}
    run = {
        "c": cuts.pop() if len(cuts) == 1 else "mixed",
        "rounds": summary["config"]["run"]["rounds"],
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


def _cell(row: dict, key: str) -> str:
    if key.startswith("kid_mean_"):
        std = row[key.replace("mean", "std")]
        return f"{_num(row[key])} ± {_num(std)}" if not math.isnan(row[key]) else "-"
    return _num(row[key])


def _num(v) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def write_tables(table: list[dict], out: str) -> str:
    """table.csv and table.md; returns the markdown."""
    with open(os.path.join(out, "table.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, list(COLUMNS))
        w.writeheader()
        w.writerows(table)
    features = sorted({r["features"] for r in table})
    lines = [f"Features for FID/KID: {', '.join(features)}. KID: mean ± std over subsets (n/a: one subset).", ""]
    for title, keys in (("Quality", QUALITY), ("Disclosure of x_c and client compute", DISCLOSURE)):
        lines += [f"### {title}", "", "| " + " | ".join(COLUMNS[k] for k in keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_cell(r, k) for k in keys) + " |" for r in table]
        lines.append("")
    text = "\n".join(lines)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text)
    return text


def figure(pooled: list[dict], path: str) -> bool:
    """Three panels over c: FID per image set, disclosure of x_c, client compute."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report: matplotlib is not installed, no figure (pip install 'collafuse-hpc[report]')")
        return False
    cs = [r["c"] for r in pooled]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for name in SETS:
        ax[0].plot(cs, [r[f"fid_{name}"] for r in pooled], marker="o", label=name)
    ax[0].set(xlabel="cut ratio c (share of steps on the client)", ylabel=f"FID ({pooled[0]['features']})")
    ax[0].set_title("quality, pooled over clients (lower is better)")
    ax[0].legend(fontsize=8)
    ax[1].plot(cs, [r["psnr_x_c_db"] for r in pooled], marker="o", color="tab:red", label="PSNR(x_c, x_0) dB")
    ax[1].set(xlabel="cut ratio c", ylabel="PSNR of x_c against x_0 (dB)")
    twin = ax[1].twinx()
    mus = [max(r["mu_gdp_composed"], 1e-3) for r in pooled]
    twin.semilogy(cs, mus, marker="s", color="tab:purple", label="mu-GDP")
    twin.set_ylabel("composed mu-GDP (log)")
    ax[1].legend(handles=ax[1].lines + twin.lines, fontsize=8)
    ax[1].set_title("disclosure of what crosses the wire")
    ax[2].plot(cs, [r["sampling_flops_ratio"] for r in pooled], marker="o", label="sampling FLOPs (exact)")
    ax[2].plot(cs, [r["sampling_time_ratio"] for r in pooled], marker="x", linestyle=":", label="sampling time")
    ax[2].plot(cs, [r["sampling_ideal_ratio"] for r in pooled], linestyle="--", label="sampling, ideal (c)")
    ax[2].plot(cs, [r["train_flops_ratio"] for r in pooled], marker="^", label="training FLOPs (exact)")
    ax[2].plot(cs, [r["train_time_ratio"] for r in pooled], marker="v", linestyle=":", label="training time")
    ax[2].set(xlabel="cut ratio c", ylabel="client / local-only")
    ax[2].set_title("client compute, mean over clients")
    ax[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="results.h5 files of evaluated runs")
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args()
    table = []
    for path in args.results:
        try:
            s = summarize(path)
        except (OSError, ValueError) as e:
            print(f"report: error: {e}", file=sys.stderr)
            return 2
        if "metrics" not in s:
            print(f"report: {path} has no metrics (run collafuse-hpc evaluate on it); left out")
            continue
        run = rows(s)
        table += run
        export(path, os.path.join(args.out, "grids", f"c{run[0]['c']}"))
    if not table:
        print("report: no evaluated runs")
        return 1
    table.sort(key=lambda r: (isinstance(r["c"], str), r["c"], r["who"] != "pooled"))
    os.makedirs(args.out, exist_ok=True)
    print(write_tables(table, args.out))
    drew = figure([r for r in table if r["who"] == "pooled"], os.path.join(args.out, "tradeoff.png"))
    print(f"report: {args.out}/table.csv, table.md" + (", tradeoff.png" if drew else "") + ", grids/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
