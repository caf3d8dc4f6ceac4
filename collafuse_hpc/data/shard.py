"""HDF5 client shards: format, validation and a lazy batch reader.

One file per client, both splits inside::

    /                     attrs: schema="collafuse-shard", schema_version=2, dataset,
                          source, image_size, channels, recipe, client_id, partition,
                          train_count, test_count, attribute_names (if any),
                          content_hash (sha256 of every dataset below), created
    /<split>/images       uint8 [N, C, H, W], one chunk per image, uncompressed
                          (a random single-image read touches one small chunk)
    /<split>/labels       int64 [N] (optional)
    /<split>/attributes   int8 [N, A], 0/1 (optional; names in attribute_names)
    /<split>/ids          UTF-8 strings [N]: source file name or id of each image

``<split>`` is ``train`` and ``test``. Pixels are 0..255; :func:`to_model_range`
maps them to float in [-1, 1] on the device.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import h5py
import numpy as np

from collafuse_hpc.atomic import new_hdf5

if TYPE_CHECKING:  # torch is imported where a tensor is made: reading and checking shards needs none (config,
    import torch  # inspect and report import this module, and torch costs 1.5 s of CPU a start)

SCHEMA = "collafuse-shard"
SCHEMA_VERSION = 2
REQUIRED_ATTRS = ("channels", "image_size", "content_hash")
SPLITS = ("train", "test")


@dataclass
class Split:
    """One split of a shard, in memory."""

    images: np.ndarray  # uint8 [N, C, H, W]
    labels: np.ndarray | None = None  # int64 [N]
    attributes: np.ndarray | None = None  # int8 [N, A]
    ids: list[str] | None = None  # source file name / id per image


@dataclass(frozen=True)
class ShardInfo:
    path: str
    channels: int
    image_size: int
    counts: dict[str, int]  # images per split
    has_labels: bool
    attribute_names: tuple[str, ...]
    content_hash: str
    partition: str = ""  # the rule that made it: iid, class, dirichlet, attributes ("" if not recorded)


def _datasets(split: Split) -> dict[str, np.ndarray]:
    out = {"images": split.images}
    if split.labels is not None:
        out["labels"] = np.asarray(split.labels, dtype=np.int64)
    if split.attributes is not None:
        out["attributes"] = np.asarray(split.attributes, dtype=np.int8)
    if split.ids is not None:
        out["ids"] = np.array(split.ids, dtype=object)
    return out


def content_hash(splits: dict[str, Split]) -> str:
    """The content_hash that :func:`write_shard` stores for ``splits``, without writing."""
    return _content_hash({name: _datasets(split) for name, split in splits.items()})


def _content_hash(tree: dict[str, dict[str, np.ndarray]]) -> str:
    """sha256 over {split: {dataset: array}} in sorted order (strings joined by NUL)."""
    h = hashlib.sha256()
    for split in sorted(tree):
        for key in sorted(tree[split]):
            data = tree[split][key]
            h.update(f"{split}/{key}".encode())
            if data.dtype == object:
                h.update("\0".join(d.decode() if isinstance(d, bytes) else d for d in data).encode())
            else:
                h.update(np.ascontiguousarray(data).tobytes())
    return h.hexdigest()


def write_shard(path: str, splits: dict[str, Split], attribute_names: list[str] | None = None, **attrs) -> str:
    """Write a shard atomically (temp file, then rename); returns its content hash.

    Args:
        splits: {"train": Split, "test": Split}.
        attribute_names: names of the attribute columns, if any split has attributes.
        attrs: file attributes (dataset, source, recipe, client_id, partition, ...).
    """
    tree = {name: _datasets(split) for name, split in splits.items()}
    content_hash = _content_hash(tree)
    with new_hdf5(path) as f:
        for name, datasets in tree.items():
            images = datasets["images"]
            assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[2] == images.shape[3]
            g = f.create_group(name)
            for key, data in datasets.items():
                if data.dtype == object:
                    g.create_dataset(key, data=data, dtype=h5py.string_dtype())
                elif key == "images":
                    g.create_dataset(key, data=data, chunks=(1, *data.shape[1:]) if len(data) else None)
                else:
                    g.create_dataset(key, data=data)
        first = next(iter(splits.values())).images
        f.attrs.update(
            schema=SCHEMA,
            schema_version=SCHEMA_VERSION,
            channels=first.shape[1],
            image_size=first.shape[2],
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            content_hash=content_hash,
            **{f"{name}_count": len(split.images) for name, split in splits.items()},
            **attrs,
        )
        if attribute_names is not None:
            f.attrs["attribute_names"] = np.array(attribute_names, dtype=h5py.string_dtype())
    return content_hash


def inspect_shard(path: str, verify_hash: bool = False) -> ShardInfo:
    """Open and validate a shard; ValueError naming the file and the problem.

    ``verify_hash`` re-reads every dataset and compares the content hash (slow
    for large shards; use it after copying shards between file systems).
    """
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"shard {path!r} is not a readable HDF5 file: {e}") from None
    with f:
        if f.attrs.get("schema") != SCHEMA:
            raise ValueError(f"shard {path!r} has schema {f.attrs.get('schema')!r}, expected {SCHEMA!r}")
        if f.attrs.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(
                f"shard {path!r} has schema_version {f.attrs.get('schema_version')}; "
                f"this package reads version {SCHEMA_VERSION}: prepare it again"
            )
        missing = [a for a in REQUIRED_ATTRS if a not in f.attrs]
        if missing:
            raise ValueError(f"shard {path!r} lacks the attribute(s) {missing}: it is damaged; prepare it again")
        names = tuple(str(n) for n in f.attrs.get("attribute_names", []))
        geometry = (int(f.attrs["channels"]), int(f.attrs["image_size"]), int(f.attrs["image_size"]))
        counts, labels = {}, []
        for split in SPLITS:
            if split not in f or "images" not in f[split]:
                raise ValueError(f"shard {path!r} has no '{split}/images' dataset")
            g = f[split]
            images = g["images"]
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] == 0:
                raise ValueError(
                    f"shard {path!r}: '{split}/images' must be non-empty uint8 [N, C, H, W], "
                    f"got {images.dtype} {images.shape}"
                )
            n = images.shape[0]
            if images.shape[1:] != geometry:
                raise ValueError(f"shard {path!r}: '{split}/images' shape {images.shape} disagrees with attrs")
            if f.attrs.get(f"{split}_count") != n:
                raise ValueError(f"shard {path!r}: '{split}/images' holds {n} images, attrs say a different count")
            for key, shape in (("labels", (n,)), ("ids", (n,)), ("attributes", (n, len(names)))):
                if key in g and g[key].shape != shape:
                    raise ValueError(f"shard {path!r}: '{split}/{key}' has shape {g[key].shape}, expected {shape}")
            if "labels" in g and g["labels"].dtype.kind not in "iu":
                raise ValueError(
                    f"shard {path!r}: '{split}/labels' holds {g['labels'].dtype} values; class labels must be integers"
                )
            counts[split] = n
            labels.append("labels" in g)
        if verify_hash:
            tree = {split: {key: ds[()] for key, ds in f[split].items()} for split in f if split in SPLITS}
            if _content_hash(tree) != f.attrs["content_hash"]:
                raise ValueError(f"shard {path!r}: content does not match its content_hash (corrupt or edited)")
        rule = str(f.attrs.get("partition", "")).split(" ")[0]
        return ShardInfo(path, geometry[0], geometry[1], counts, all(labels), names, str(f.attrs["content_hash"]), rule)


class EpochSampler:
    """Shuffled batches of indices, reshuffled each epoch from (seed, epoch).

    The state (epoch, position) is two integers, so a resumed run continues the
    exact same order.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.pos = 0, 0
        self._cached: tuple[int, np.ndarray] | None = None  # (epoch, its order): drawn once per epoch

    def _order(self) -> np.ndarray:
        if self._cached is None or self._cached[0] != self.epoch:
            self._cached = (self.epoch, np.random.default_rng([self.seed, self.epoch]).permutation(self.n))
        return self._cached[1]

    def next(self) -> np.ndarray:
        """The next ``batch_size`` indices (int64), continuing into the next epoch."""
        out, need = [], self.batch_size
        while need:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
            take = min(need, self.n - self.pos)
            out.append(self._order()[self.pos : self.pos + take])
            self.pos += take
            need -= take
        return np.concatenate(out)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


class ShardReader:
    """Reads batches from one split of a shard.

    The file opens lazily on the first read, in the process that reads (never
    inherit an open HDF5 handle across fork). Each image is one uncompressed
    chunk, so a batch is read chunk by chunk as raw bytes into one array: this
    measured about 30x faster than h5py's fancy indexing of random batches and
    about 4x faster than per-image ``read_direct`` (tools/bench_loader.py).
    """

    def __init__(self, path: str, split: str = "train"):
        self.info = inspect_shard(path)
        self.path, self.split = path, split
        self._file: h5py.File | None = None
        self._images: h5py.Dataset | None = None
        self._has_labels = False
        self._labels: np.ndarray | None = None

    def __len__(self) -> int:
        return self.info.counts[self.split]

    def _group(self) -> h5py.Group:
        if self._file is None:
            self._file = h5py.File(self.path, "r")
            group = self._file[self.split]  # looked up once: a rank hosting many clients reads often
            self._images, self._has_labels = group["images"], "labels" in group
        return self._file[self.split]

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Images uint8 [B, C, H, W] and labels int64 [B] (or None), in ``indices`` order;
        IndexError naming the shard when an index is outside the split."""
        indices = np.asarray(indices)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(
                f"shard {self.path!r}: index {int(indices.max() if indices.max() >= len(self) else indices.min())} "
                f"is outside its {self.split!r} split of {len(self)} images"
            )
        self._group()
        images = self._images
        out = np.empty((len(indices), *images.shape[1:]), dtype=np.uint8)
        if images.chunks == (1, *images.shape[1:]) and not images.compression:
            # One uncompressed chunk per image: fetch its raw bytes, no selection machinery.
            dsid, zeros = images.id, (0,) * (images.ndim - 1)
            for k, i in enumerate(indices):
                out[k] = np.frombuffer(dsid.read_direct_chunk((int(i), *zeros))[1], np.uint8).reshape(out.shape[1:])
        else:
            for k, i in enumerate(indices):
                images.read_direct(out, np.s_[int(i)], np.s_[k])
        labels = self.labels()[indices] if self._has_labels else None
        return out, labels

    def labels(self) -> np.ndarray:
        """All labels of the split, int64 [N] (read once); ValueError when the shard has none."""
        if self._labels is None:
            g = self._group()
            if "labels" not in g:
                raise ValueError(f"shard {self.path!r} has no labels, but label conditioning is on")
            self._labels = g["labels"][()]
        return self._labels

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def to_model_range(images: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """uint8 [B, C, H, W] 0..255 -> float32 [B, C, H, W] in [-1, 1] on ``device``."""
    import torch

    return torch.from_numpy(images).to(device).float().div_(127.5).sub_(1.0)


def random_hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image of x [B, C, H, W] left-right with probability 1/2."""
    import torch

    flip = torch.rand(len(x), generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [B, C, H, W] in [-1, 1] -> uint8 numpy 0..255 (clipped)."""
    import torch

    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
