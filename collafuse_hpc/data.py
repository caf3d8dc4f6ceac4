"""HDF5 client shards: format, validation and a lazy batch reader.

One file per client, both splits inside::

    /                 attrs: schema="collafuse-shard", schema_version=1, dataset,
                      client_id, image_size, channels, num_classes, partition, created
    /train/images     uint8 [N, C, H, W], one chunk per image (fast random reads)
    /train/labels     int64 [N] (optional)
    /test/images      uint8 [M, C, H, W]
    /test/labels      int64 [M] (optional)

Pixels are 0..255; :func:`to_model_range` maps them to float in [-1, 1].
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import h5py
import numpy as np
import torch

SCHEMA = "collafuse-shard"
SCHEMA_VERSION = 1
SPLITS = ("train", "test")


@dataclass(frozen=True)
class ShardInfo:
    path: str
    channels: int
    image_size: int
    counts: dict[str, int]  # images per split
    has_labels: bool


def write_shard(path: str, splits: dict[str, tuple[np.ndarray, np.ndarray | None]], **attrs) -> None:
    """Write a shard atomically (temp file, then rename).

    Args:
        splits: {"train": (images uint8 [N, C, H, W], labels int64 [N] or None), "test": ...}
        attrs: stored as file attributes (dataset, client_id, partition, ...).
    """
    tmp = f"{path}.tmp{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with h5py.File(tmp, "w") as f:
        first = next(iter(splits.values()))[0]
        f.attrs.update(
            schema=SCHEMA,
            schema_version=SCHEMA_VERSION,
            channels=first.shape[1],
            image_size=first.shape[2],
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **attrs,
        )
        for name, (images, labels) in splits.items():
            assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[2] == images.shape[3]
            g = f.create_group(name)
            g.create_dataset("images", data=images, chunks=(1, *images.shape[1:]))
            if labels is not None:
                g.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
    os.replace(tmp, path)


def inspect_shard(path: str) -> ShardInfo:
    """Open and validate a shard; ValueError naming the file and the problem."""
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"shard {path!r} is not a readable HDF5 file: {e}") from None
    with f:
        if f.attrs.get("schema") != SCHEMA:
            raise ValueError(f"shard {path!r} has schema {f.attrs.get('schema')!r}, expected {SCHEMA!r}")
        if f.attrs.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(
                f"shard {path!r} has schema_version {f.attrs.get('schema_version')!r}; "
                f"this package reads version {SCHEMA_VERSION}: prepare it again"
            )
        counts, labels = {}, []
        for split in SPLITS:
            if split not in f or "images" not in f[split]:
                raise ValueError(f"shard {path!r} has no '{split}/images' dataset")
            images = f[split]["images"]
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] == 0:
                raise ValueError(
                    f"shard {path!r}: '{split}/images' must be non-empty uint8 [N, C, H, W], "
                    f"got {images.dtype} {images.shape}"
                )
            if images.shape[1:] != (f.attrs["channels"], f.attrs["image_size"], f.attrs["image_size"]):
                raise ValueError(f"shard {path!r}: '{split}/images' shape {images.shape} disagrees with attrs")
            if "labels" in f[split] and f[split]["labels"].shape != (images.shape[0],):
                raise ValueError(f"shard {path!r}: '{split}/labels' does not match '{split}/images'")
            counts[split] = images.shape[0]
            labels.append("labels" in f[split])
        return ShardInfo(path, int(f.attrs["channels"]), int(f.attrs["image_size"]), counts, all(labels))


class EpochSampler:
    """Shuffled batches of indices, reshuffled each epoch from (seed, epoch).

    The state (epoch, position) is two integers, so a resumed run continues the
    exact same order.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.pos = 0, 0

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def next(self) -> np.ndarray:
        """The next ``batch_size`` indices (int64), continuing into the next epoch."""
        out = []
        while sum(len(o) for o in out) < self.batch_size:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
            take = min(self.batch_size - sum(len(o) for o in out), self.n - self.pos)
            out.append(self._order()[self.pos : self.pos + take])
            self.pos += take
        return np.concatenate(out)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


class ShardReader:
    """Reads batches from one split of a shard; the file opens lazily on first use
    (never inherit an open HDF5 handle across fork)."""

    def __init__(self, path: str, split: str = "train"):
        self.info = inspect_shard(path)
        self.path, self.split = path, split
        self._file: h5py.File | None = None

    def __len__(self) -> int:
        return self.info.counts[self.split]

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Images uint8 [B, C, H, W] and labels int64 [B] (or None), in ``indices`` order."""
        if self._file is None:
            self._file = h5py.File(self.path, "r")
        g = self._file[self.split]
        order = np.argsort(indices)
        sorted_idx = indices[order]
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        unique, first = np.unique(sorted_idx, return_inverse=True)
        images = g["images"][unique][first][inverse]
        labels = g["labels"][unique][first][inverse] if "labels" in g else None
        return images, labels

    def labels(self) -> np.ndarray:
        """All labels of the split, int64 [N]; ValueError when the shard has none."""
        if not self.info.has_labels:
            raise ValueError(f"shard {self.path!r} has no labels, but label conditioning is on")
        with h5py.File(self.path, "r") as f:
            return f[self.split]["labels"][()]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def to_model_range(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 [B, C, H, W] 0..255 -> float32 [B, C, H, W] in [-1, 1] on ``device``."""
    return torch.from_numpy(images).to(device).float().div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [B, C, H, W] in [-1, 1] -> uint8 numpy 0..255 (clipped)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
