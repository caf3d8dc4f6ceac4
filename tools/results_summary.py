#!/usr/bin/env python3
"""Summarize a collafuse-hpc results.h5 with plain h5py (no collafuse_hpc import).

    python tools/results_summary.py runs/quickstart-*/results.h5

Prints the run's schema and versions, each role's rounds logged, mean losses over
the last 10% of rounds, images/s, and each client's audit (what left the client).
Roles whose part file is missing (a crashed or partial run) are reported as such.
"""

from __future__ import annotations

import argparse
import sys

import h5py
import numpy as np


def _tail_mean(ds: h5py.Dataset) -> float:
    values = ds[()]
    tail = values[-max(1, len(values) // 10) :]
    return float(np.nanmean(tail)) if len(tail) and not np.isnan(tail).all() else float("nan")


def summarize(path: str, out=sys.stdout) -> int:
    """Write the summary of ``path`` to ``out``; returns the number of roles missing."""
    missing = 0
    with h5py.File(path, "r") as f:
        a = f.attrs
        out.write(f"{path}: {a['schema']} v{a['schema_version']}, package {a['package_version']}, ")
        out.write(f"torch {a['torch_version']}, seed {a['seed']}, created {a['created']}\n")
        roles = ["server"] + [f"clients/{c}" for c in f.get("clients", {})]
        for key in roles:
            try:
                g = f[key]
            except KeyError:
                out.write(f"  {key}: part file missing\n")
                missing += 1
                continue
            rounds = g["rounds"] if "rounds" in g else {}
            n = len(rounds["round"]) if "round" in rounds else 0
            parts = [f"{n} rounds logged"]
            for name in ("loss_local", "loss_server", "images_per_s"):
                if name in rounds:
                    parts.append(f"{name} {_tail_mean(rounds[name]):.4g}")
            out.write(f"  {key}: " + ", ".join(parts) + "\n")
            if "audit" in g:
                au = g["audit"].attrs
                out.write(
                    f"    audit: t_c={au['t_c']}, {au['images_sent']} images in {au['messages_sent']} "
                    f"messages, {au['bytes_sent']} bytes sent\n"
                )
            if "samples/images" in g:
                out.write(f"    samples: {g['samples/images'].shape} uint8\n")
    return missing


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="results.h5 files")
    args = p.parse_args()
    return 1 if sum(summarize(r) for r in args.results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
