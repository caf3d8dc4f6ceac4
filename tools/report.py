#!/usr/bin/env python3
"""Sweep report: one table and the trade-off figure from several results files.

    python tools/report.py runs/sweep-*/c*/results.h5 --out runs/sweep-x/report

Writes into --out:
  table.csv, table.md   one row per run (sorted by cut ratio c): FID/KID pooled over
                        clients for each image set, disclosure of x_c (SNR, PSNR, SSIM,
                        composed mu-GDP), client compute (sampling and training time
                        against local-only, and the ideal), images/s of server and clients
  tradeoff.png          quality vs disclosure vs client compute over c (needs matplotlib:
                        pip install 'collafuse-hpc[report]'; skipped with a note otherwise)
  grids/                sample grids per run, client and image set (PNG)
Runs without metrics (not evaluated) are listed and left out of the table.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from collafuse_hpc.evaluate import SETS  # noqa: E402
from collafuse_hpc.inspection import export, summarize  # noqa: E402


def _mean(values: list) -> float:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else float("nan")


def row(summary: dict) -> dict:
    """The table row of one evaluated run (per-client figures averaged over clients)."""
    m = summary["metrics"]
    clients = [who for who in m if who not in ("attrs", "pooled")]
    cuts = {c.get("cut_ratio") for c in summary["config"]["clients"]}
    out = {"c": cuts.pop() if len(cuts) == 1 else "mixed", "rounds": summary["config"]["run"]["rounds"]}
    for name in SETS:
        q = m["pooled"].get(name, {})
        out[f"fid_{name}"] = q.get("fid", float("nan"))
        out[f"kid_{name}"] = q.get("kid_mean", float("nan"))
    d = [m[c]["disclosure"] for c in clients]
    out["t_c"] = _mean([x["t_c"] for x in d])
    out["snr"] = _mean([x["snr"] for x in d])
    out["psnr_db"] = _mean([x["psnr_db"] for x in d])
    out["ssim"] = _mean([x["ssim"] for x in d])
    out["mu_composed"] = _mean([x["mu_composed"] for x in d])
    c = [m[k]["compute"] for k in clients]
    for key in ("sampling_time_ratio", "sampling_ideal_ratio", "train_time_ratio"):
        out[key] = _mean([x[key] for x in c])
    roles = summary["roles"]
    out["server_images_per_s"] = roles.get("server", {}).get("summary", {}).get("images_per_s", float("nan"))
    out["client_images_per_s"] = _mean(
        [r.get("summary", {}).get("images_per_s") for k, r in roles.items() if k.startswith("clients/")]
    )
    out["extractor"] = m["attrs"]["extractor"]
    return out


def write_tables(rows: list[dict], out: str) -> None:
    keys = list(rows[0])
    with open(os.path.join(out, "table.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def figure(rows: list[dict], path: str) -> bool:
    """Three panels over c: FID per image set, disclosure of x_c, client compute."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report: matplotlib is not installed, no figure (pip install 'collafuse-hpc[report]')")
        return False
    cs = [r["c"] for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for name in SETS:
        ax[0].plot(cs, [r[f"fid_{name}"] for r in rows], marker="o", label=name)
    ax[0].set(xlabel="cut ratio c (share of steps on the client)", ylabel=f"FID ({rows[0]['extractor']})")
    ax[0].set_title("quality (lower is better)")
    ax[0].legend(fontsize=8)
    ax[1].plot(cs, [r["psnr_db"] for r in rows], marker="o", color="tab:red", label="PSNR(x_c, x_0) dB")
    ax[1].set(xlabel="cut ratio c", ylabel="PSNR of x_c against x_0 (dB)")
    twin = ax[1].twinx()
    twin.semilogy(cs, [max(r["mu_composed"], 1e-3) for r in rows], marker="s", color="tab:purple", label="mu-GDP")
    twin.set_ylabel("composed mu-GDP (log)")
    ax[1].legend(handles=ax[1].lines + twin.lines, fontsize=8)
    ax[1].set_title("disclosure of what crosses the wire")
    ax[2].plot(cs, [r["sampling_time_ratio"] for r in rows], marker="o", label="sampling time, measured")
    ax[2].plot(cs, [r["sampling_ideal_ratio"] for r in rows], linestyle="--", label="sampling, ideal (c)")
    ax[2].plot(cs, [r["train_time_ratio"] for r in rows], marker="^", label="training step time")
    ax[2].set(xlabel="cut ratio c", ylabel="client / local-only")
    ax[2].set_title("client compute")
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
    os.makedirs(os.path.join(args.out, "grids"), exist_ok=True)
    rows = []
    for path in args.results:
        s = summarize(path)
        if "metrics" not in s:
            print(f"report: {path} has no metrics (run collafuse-hpc evaluate on it); left out")
            continue
        r = row(s)
        rows.append(r)
        export(path, os.path.join(args.out, "grids", f"c{r['c']}"))
    if not rows:
        print("report: no evaluated runs")
        return 1
    rows.sort(key=lambda r: (isinstance(r["c"], str), r["c"]))
    write_tables(rows, args.out)
    drew = figure(rows, os.path.join(args.out, "tradeoff.png"))
    with open(os.path.join(args.out, "table.md")) as f:
        print(f.read())
    print(f"report: {args.out}/table.csv, table.md" + (", tradeoff.png" if drew else "") + ", grids/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
