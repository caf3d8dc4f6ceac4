"""Client shards from datasets on disk or bundled in a package.

``digits``: the 1,797 handwritten digits (8x8, 17 grey levels, from the UCI
optical recognition set) that scikit-learn ships inside its wheel, so the
quickstart needs no network. Upscaled with bicubic resampling to ``size``.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from .data import write_shard


def partition(labels: np.ndarray, clients: int, rule: str, seed: int) -> list[np.ndarray]:
    """Indices per client. ``class``: classes dealt out in contiguous blocks, so each
    client holds different digits (non-iid); ``iid``: a shuffled even split."""
    rng = np.random.default_rng(seed)
    if rule == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), clients)]
    classes = np.unique(labels)
    if clients > len(classes):
        raise ValueError(f"partition 'class' needs at most {len(classes)} clients, got {clients}")
    return [np.flatnonzero(np.isin(labels, group)) for group in np.array_split(classes, clients)]


def prepare_digits(out: str, clients: int, size: int, rule: str, test_fraction: float, seed: int) -> list[str]:
    """Write ``out/client_<k>.h5`` for k < clients; returns the paths."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "the digits quickstart data ship with scikit-learn: pip install 'collafuse-hpc[quickstart]'"
        ) from None
    if clients < 1 or not 0 < test_fraction < 1:
        raise ValueError("need clients >= 1 and 0 < test_fraction < 1")
    digits = load_digits()
    raw = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # (N, 8, 8)
    images = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in raw])
    images = images[:, None]  # (N, 1, size, size)
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    paths = []
    for k, idx in enumerate(partition(labels, clients, rule, seed)):
        idx = rng.permutation(idx)
        n_test = max(1, int(round(len(idx) * test_fraction)))
        test, train = np.sort(idx[:n_test]), np.sort(idx[n_test:])
        path = os.path.join(out, f"client_{k}.h5")
        write_shard(
            path,
            {"train": (images[train], labels[train]), "test": (images[test], labels[test])},
            dataset="sklearn-digits",
            client_id=f"client_{k}",
            num_classes=10,
            partition=f"{rule} seed={seed} clients={clients}",
            source="sklearn.datasets.load_digits (UCI optical recognition of handwritten digits)",
            resize=f"8x8 -> {size}x{size} bicubic",
        )
        hist = np.bincount(labels[train], minlength=10)
        print(f"{path}: {len(train)} train, {len(test)} test, train labels per digit {hist.tolist()}")
        paths.append(path)
    return paths
