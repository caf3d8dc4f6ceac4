#!/usr/bin/env python3
"""Loader benchmark: HDF5 shard reads vs decoding JPEG files with PIL every step.

    python tools/bench_loader.py [--images 2000] [--size 64] [--batch 64] [--seconds 3] [--json out.json]

Makes CelebA-sized JPEGs (178x218) in a temporary folder, prepares them into a
64x64 shard with the project's own pipeline, then measures images/s for random
batches, side by side in one run:
  jpeg        PIL open + centre crop + resize + to float in [-1, 1] (what the
              authors' code does every training step)
  shard       ShardReader.read (per-image chunk reads) + to float (what runs use)
  shard-fancy h5py fancy indexing of the sorted batch (an alternative reader)
  shard-read_direct  h5py read_direct per image (another alternative)
Prints a table and the shard/jpeg ratio (target: at least 20x).
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
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    harness.refuse_existing_outputs(p, [args.json])
    return args


if __name__ == "__main__":  # --help, a bad argument or an existing output: answered before torch loads (2 s of CPU)
    ARGS = _args()

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from collafuse_hpc.data import ShardReader, to_model_range  # noqa: E402
from collafuse_hpc.data.prepare import Recipe, decode_file, prepare  # noqa: E402
from collafuse_hpc.data.sources import read_folder  # noqa: E402
from collafuse_hpc.tables import format_table  # noqa: E402


def make_jpegs(folder: str, n: int) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:218, 0:178]
    for i in range(n):
        base = rng.integers(0, 200, 3)
        img = (base + 50 * np.sin(xx[..., None] / (4 + i % 7)) + (yy[..., None] * (i % 5)) % 55).clip(0, 255)
        Image.fromarray(img.astype(np.uint8)).save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)


def rate(fn, n_images: int, batch: int, seconds: float, seed: int = 0) -> float:
    """Images per second of fn(indices) over random batches for about ``seconds``."""
    rng = np.random.default_rng(seed)
    fn(rng.choice(n_images, batch, replace=False))  # warm-up (opens files, fills caches)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn(rng.choice(n_images, batch, replace=False))
        done += batch
    return done / (time.perf_counter() - t0)


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "jpegs")
        os.makedirs(folder)
        make_jpegs(folder, args.images)
        catalog = read_folder(folder)
        (path,) = prepare(catalog, os.path.join(tmp, "shards"), 1, "iid", size=args.size, test_fraction=0.01, crop=140)
        reader = ShardReader(path)
        n = len(reader)
        recipe = Recipe(args.size, 3, crop=140)

        def jpeg(idx: np.ndarray) -> torch.Tensor:
            batch = [decode_file((int(i), catalog.files[i], None, recipe))[1] for i in idx]
            return to_model_range(np.stack(batch), "cpu")

        def shard(idx: np.ndarray) -> torch.Tensor:
            return to_model_range(reader.read(idx)[0], "cpu")

        images = h5py.File(path, "r")["train/images"]  # the same dataset, read in other ways

        def shard_fancy(idx: np.ndarray) -> torch.Tensor:
            return to_model_range(images[np.sort(idx)], "cpu")

        def shard_read_direct(idx: np.ndarray) -> torch.Tensor:
            out = np.empty((len(idx), *images.shape[1:]), np.uint8)
            for k, i in enumerate(idx):
                images.read_direct(out, np.s_[int(i)], np.s_[k])
            return to_model_range(out, "cpu")

        modes = {"jpeg": jpeg, "shard": shard, "shard-fancy": shard_fancy, "shard-read_direct": shard_read_direct}
        results = {name: rate(fn, n, args.batch, args.seconds) for name, fn in modes.items()}
    print(
        f"{args.images} CelebA-sized JPEGs -> {args.size}x{args.size}, random batches of {args.batch}, 1 thread\n"
        + format_table(["reader", "images/s"], [[name, round(value)] for name, value in results.items()])
    )
    ratio = results["shard"] / results["jpeg"]
    print(
        f"ratio shard/jpeg: {ratio:.1f}x (target >= 20x); shard/shard-fancy: "
        f"{results['shard'] / results['shard-fancy']:.2f}x"
    )
    harness.save_json(args.json, {"images_per_s": results, "ratio_shard_over_jpeg": ratio, **vars(args)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main(ARGS))
