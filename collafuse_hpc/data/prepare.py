"""Build per-client shards from a :class:`~collafuse_hpc.data.sources.Catalog`.

Pipeline: partition the catalog across clients, split each client's pool into
train/test, decode every needed image once (in parallel processes, with a
progress line) into a resumable cache, then write one shard per client.

- Idempotent and resumable: decoded pixels go to ``<out>/.cache/<key>/``
  (:mod:`.decode_cache`) with a per-image state and the source file's size and
  mtime, one file per chunk; an interrupted or failed run continues where it
  stopped, a repeated run decodes nothing but the images whose file changed and
  those that failed before.
- Unreadable images (missing, corrupt) are reported and left out; with
  ``strict`` the run fails after the cache is flushed, naming them, and nothing
  already decoded is lost.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import multiprocessing.pool
import os
import re
import signal
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import h5py
import numpy as np
from PIL import Image

from collafuse_hpc.atomic import check_destination, free_space, made_folder, refuse_existing
from collafuse_hpc.data import partition as part
from collafuse_hpc.data.decode_cache import DONE, FAILED, DecodeCache
from collafuse_hpc.data.shard import Split, content_hash, inspect_shard, write_shard
from collafuse_hpc.data.sources import Catalog
from collafuse_hpc.logs import Progress

CHUNK = 256  # images decoded per cache file


@dataclass(frozen=True)
class Recipe:
    """How source pixels become shard pixels."""

    size: int  # output side, pixels
    channels: int  # 1 grey, 3 RGB
    crop: int = 0  # centre crop side in source pixels before resizing; 0 = largest centred square
    bbox_margin: float = -1.0  # >= 0: square crop around the bounding box, grown by this fraction

    def describe(self, sides: np.ndarray) -> str:
        """What was done, given the crop sides used per image (source pixels)."""
        lo, hi = (int(sides.min()), int(sides.max())) if len(sides) else (0, 0)
        used = f"{lo}" if lo == hi else f"{lo}..{hi}"
        if self.bbox_margin >= 0:
            how = f"square around the bounding box grown by {self.bbox_margin} per side ({used} px)"
        elif self.crop and hi < self.crop:
            how = f"centre crop {used} (asked {self.crop}, limited by the image size)"
        elif self.crop:
            how = f"centre crop {self.crop}"
        else:
            how = f"largest centred square ({used} px)"
        return f"{how}, bicubic resize to {self.size}x{self.size}, {self.channels} channel(s)"


def _crop_box(w: int, h: int, recipe: Recipe, box: np.ndarray | None) -> tuple[int, int, int, int]:
    if box is not None and recipe.bbox_margin >= 0:
        x, y, bw, bh = box
        side = max(bw, bh) * (1 + 2 * recipe.bbox_margin)
        cx, cy = x + bw / 2, y + bh / 2
    else:
        side = min(recipe.crop or min(w, h), w, h)
        cx, cy = w / 2, h / 2
    side = min(side, w, h)
    left = int(round(min(max(cx - side / 2, 0), w - side)))
    top = int(round(min(max(cy - side / 2, 0), h - side)))
    return left, top, left + int(round(side)), top + int(round(side))


def _finish(img: Image.Image, recipe: Recipe, box: np.ndarray | None) -> tuple[np.ndarray, int]:
    """(uint8 [C, S, S], the side of the square cut from the source, pixels)."""
    img = img.convert("L" if recipe.channels == 1 else "RGB")
    left, top, right, _ = crop = _crop_box(*img.size, recipe, box)
    img = img.crop(crop).resize((recipe.size, recipe.size), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    return (arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)), right - left  # (C, H, W)


def _worker_init() -> None:
    """Pool workers take default SIGTERM/SIGUSR1 handling (a parent may have installed
    its own SIGTERM handler, which would make Pool.terminate wait forever) and ignore
    SIGINT: on Ctrl-C the parent stops and terminates them (a worker that died of the
    SIGINT could hang the pool's shutdown)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def decode_file(job: tuple[int, str, np.ndarray | None, Recipe]) -> tuple[int, np.ndarray | None, int, str]:
    """Worker: (index, path, box, recipe) -> (index, uint8 [C, S, S] or None, crop side, error text)."""
    i, path, box, recipe = job
    try:
        with Image.open(path) as img:
            return i, *_finish(img, recipe, box), ""
    except Exception as e:  # noqa: BLE001 - every unreadable image is reported, not fatal
        return i, None, 0, f"{path}: {type(e).__name__}: {e}"


def _stamp(path: str) -> tuple[int, int]:
    """(size in bytes, mtime in ns) of a source file; (-1, -1) when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def _cache_path(out: str, catalog: Catalog, recipe: Recipe) -> str:
    key = json.dumps([catalog.dataset, catalog.source, len(catalog), asdict(recipe)])
    return os.path.join(out, ".cache", f"{catalog.dataset}-{hashlib.sha1(key.encode()).hexdigest()[:12]}")


def decode(
    catalog: Catalog, needed: np.ndarray, recipe: Recipe, out: str, workers: int, strict: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixels of ``needed`` images: (uint8 [len(needed), C, S, S], ok mask [len(needed)],
    crop side used per image [len(needed)], source pixels)."""
    shape = (recipe.channels, recipe.size, recipe.size)
    if catalog.arrays is not None:  # already in memory (MNIST, digits): resize in-process
        done = [_finish(Image.fromarray(catalog.arrays[i]), recipe, None) for i in needed]
        images = np.stack([d[0] for d in done]).reshape(len(needed), *shape)
        return images, np.ones(len(needed), dtype=bool), np.array([d[1] for d in done])
    cache = DecodeCache(_cache_path(out, catalog, recipe), len(catalog), shape)
    if os.path.exists(cache.folder + ".h5"):
        print(f"note: {cache.folder}.h5, the cache of an earlier version, is not read: remove it", file=sys.stderr)
    workers = workers or os.cpu_count() or 1
    pool = mp.get_context("fork").Pool(workers, initializer=_worker_init)
    try:
        return _decode_into_cache(catalog, needed, recipe, cache, pool, strict)
    finally:
        pool.terminate()
        pool.join()


def _decode_into_cache(
    catalog: Catalog, needed: np.ndarray, recipe: Recipe, cache: DecodeCache, pool: mp.pool.Pool, strict: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    errors: list[str] = []
    now = {int(i): _stamp(catalog.files[i]) for i in needed}
    # decode what is new, what failed before (it may have been fixed) and what changed since
    todo = [int(i) for i in needed if cache.state[i] != DONE or tuple(cache.stamp[i]) != now[int(i)]]
    image_bytes = int(np.prod(cache.shape))
    need = (len(todo) + len(needed)) * image_bytes
    kept = bool((cache.state == DONE).any())
    _check_space(os.path.dirname(cache.folder), need, "decoded images and shards", kept)
    progress = Progress(f"decoding {catalog.dataset}", len(todo))
    boxes = catalog.boxes if recipe.bbox_margin >= 0 else None
    jobs = ((i, catalog.files[i], None if boxes is None else boxes[i], recipe) for i in todo)
    done = failed = 0
    batch: list[tuple[int, np.ndarray | None, int]] = []
    for i, pixels, side, error in pool.imap_unordered(decode_file, jobs, chunksize=16):
        if pixels is None:
            errors.append(error)
            failed += 1
        batch.append((i, pixels, side))
        done += 1
        if len(batch) >= CHUNK or done == len(todo):
            batch.sort(key=lambda b: b[0])
            index = np.array([b[0] for b in batch], np.int64)
            cache.add(
                index,
                np.array([FAILED if b[1] is None else DONE for b in batch], np.int8),
                np.array([b[2] for b in batch], np.int32),
                np.array([now[b[0]] for b in batch], np.int64).reshape(-1, 2),
                np.stack([np.zeros(cache.shape, np.uint8) if b[1] is None else b[1] for b in batch]),
            )
            batch = []
        progress.update(1, f"{failed} unreadable")
    ok = cache.state[needed] == DONE
    if errors or (~ok).any():
        missing = [catalog.files[i] for i in needed[~ok]]
        shown = "\n  ".join(errors[:10] or missing[:10])
        print(f"{int((~ok).sum())} unreadable image(s) left out, e.g.:\n  {shown}", file=sys.stderr)
        if strict:
            raise ValueError(
                f"{int((~ok).sum())} unreadable image(s) (strict mode), first {missing[0]!r}; "
                f"decoded images are kept in {cache.folder!r} for the next run"
            )
    images = np.zeros((len(needed), *cache.shape), np.uint8)
    cache.read(needed, images)
    return images, ok, cache.side[needed]


def _check_space(folder: str, need: int, what: str, kept: bool = False) -> None:
    """Refuse, before the work, a disk that cannot hold ``need`` bytes (a lower bound) of
    ``what``; ``kept``: the cache holds images decoded before, which the message says."""
    free = free_space(folder)
    if free < need:
        raise ValueError(
            f"{folder!r} has {free / 1e6:.1f} MB free, and the {what} need at least {need / 1e6:.1f} MB; "
            "free space or choose another --out" + (" (the images decoded before are kept)" if kept else "")
        )


def _histogram(labels: np.ndarray | None) -> str:
    if labels is None:
        return "-"
    values, counts = np.unique(labels, return_counts=True)
    if len(values) > 12:
        return f"{len(values)} classes, largest {counts.max()}"
    return " ".join(f"{v}:{c}" for v, c in zip(values, counts))


def prepare(
    catalog: Catalog,
    out: str,
    clients: int,
    rule: str = "iid",
    *,
    seed: int = 0,
    size: int = 64,
    crop: int = 0,
    bbox_margin: float = -1.0,
    groups: list[list[str]] | None = None,
    exclusive: bool = False,
    alpha: float = 0.5,
    test_fraction: float = 0.2,
    train_size: int = 0,
    test_size: int = 0,
    workers: int = 0,
    strict: bool = False,
) -> list[str]:
    """Write ``out/client_<k>.h5`` for k < clients and print a table; returns the paths.

    Every argument is checked before anything is written; shards of a previous
    preparation with more clients (``client_<k>.h5``, k >= clients) are removed."""
    if clients < 1 or not 0 <= test_fraction < 1:
        raise ValueError(f"need clients >= 1 and 0 <= test_fraction < 1, got {clients}, {test_fraction}")
    if size < 1 or crop < 0:
        raise ValueError(f"--size must be >= 1 and --crop >= 0 pixels, got {size} and {crop}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"--alpha (the Dirichlet concentration) must be a positive number, got {alpha}")
    if bbox_margin >= 0 and catalog.boxes is None:
        raise ValueError(f"--bbox-margin needs bounding boxes (CUB); {catalog.dataset} has none")
    check_destination(out, folder=True)
    if rule not in part.RULES:
        raise ValueError(f"unknown partition rule {rule!r}; valid: {list(part.RULES)}")
    if rule in ("class", "dirichlet") and catalog.labels is None:
        raise ValueError(f"partition {rule!r} needs labels, and {catalog.dataset} from {catalog.source!r} has none")
    rng = np.random.default_rng(seed)
    if rule == "iid":
        pools = part.iid(len(catalog), clients, rng)
    elif rule == "class":
        pools = part.by_class(catalog.labels, clients)
    elif rule == "dirichlet":
        pools = part.dirichlet(catalog.labels, clients, alpha, rng)
    else:
        if catalog.attributes is None or not groups or len(groups) != clients:
            raise ValueError(
                f"partition 'attributes' needs a catalog with attributes and one group per client "
                f"({clients}), e.g. --groups 'Male;Eyeglasses,Wearing_Hat'"
            )
        pools = part.by_attributes(catalog.attributes, catalog.attribute_names, groups, exclusive, rng)
    splits = [part.train_test(p, catalog.split, test_fraction, train_size, test_size, rng) for p in pools]
    for k, (train, test) in enumerate(splits):
        if len(train) == 0 or len(test) == 0:
            raise ValueError(f"client {k} gets {len(train)} train and {len(test)} test images; change the partition")

    recipe = Recipe(size, catalog.channels, crop, bbox_margin)
    plan = [{name: [catalog.ids[i] for i in idx] for name, idx in zip(("train", "test"), s)} for s in splits]
    _refuse_other_shards(out, lambda k, path: k < clients and _may_hold(path, plan[k], recipe))  # before decoding
    needed = np.unique(np.concatenate([np.concatenate(s) for s in splits]))
    images, ok, sides = decode(catalog, needed, recipe, out, workers, strict)
    where = {int(i): k for k, i in enumerate(needed)}
    for note in catalog.notes:
        print(f"note: {note}")

    def kept(idx: np.ndarray) -> np.ndarray:
        """Positions in ``needed`` of the catalog images ``idx`` that decoded."""
        return np.array([where[int(i)] for i in idx if ok[where[int(i)]]], dtype=np.int64)

    def subset(pos: np.ndarray) -> Split:
        idx = needed[pos]
        return Split(
            images=images[pos],
            labels=None if catalog.labels is None else catalog.labels[idx],
            attributes=None if catalog.attributes is None else catalog.attributes[idx],
            ids=[catalog.ids[i] for i in idx],
        )

    positions = [(kept(train), kept(test)) for train, test in splits]
    shards = [{"train": subset(train), "test": subset(test)} for train, test in positions]
    for k, shard in enumerate(shards):  # after decoding: unreadable images may have emptied a client
        if min(len(shard["train"].images), len(shard["test"].images)) == 0:
            raise ValueError(
                f"client {k} keeps {len(shard['train'].images)} train and {len(shard['test'].images)} test images "
                "once unreadable images are left out; no shard was written. Fix the images or change the partition"
            )
    partition = (
        f"{rule} seed={seed} clients={clients}"
        + (f" groups={groups} {'exclusive' if exclusive else 'overlap'}" if rule == "attributes" else "")
        + (f" alpha={alpha}" if rule == "dirichlet" else "")
    )
    hashes = [content_hash(shard) for shard in shards]
    _refuse_other_shards(out, lambda k, path: k < len(hashes) and inspect_shard(path).content_hash == hashes[k])
    _check_space(out, sum(split.images.nbytes for shard in shards for split in shard.values()), "shards")
    paths = [os.path.join(out, f"client_{k}.h5") for k in range(len(shards))]
    made = []  # shards where there was none: removed when a later one cannot be written
    with made_folder(out):
        try:
            for k, (path, shard) in enumerate(zip(paths, shards)):
                new = not os.path.lexists(path)  # else the same shard (refused above otherwise)
                write_shard(
                    path,
                    shard,
                    attribute_names=catalog.attribute_names,
                    dataset=catalog.dataset,
                    source=catalog.source,
                    recipe=recipe.describe(sides[np.concatenate(positions[k])]),
                    client_id=f"client_{k}",
                    partition=partition,
                    split="train+test"
                    + (" (official)" if catalog.split is not None else f" (test_fraction={test_fraction})"),
                )
                if new:
                    made.append(path)
        except BaseException:
            for path in made:
                os.remove(path)
            raise
    print(f"{'client':<10}{'train':>8}{'test':>8}  train labels")
    for k, shard in enumerate(shards):
        print(
            f"{'client_' + str(k):<10}{len(shard['train'].images):>8}{len(shard['test'].images):>8}  "
            f"{_histogram(shard['train'].labels)}"
        )
    return paths


def _refuse_other_shards(out: str, same: Callable[[int, str], bool]) -> None:
    """Refuse, before any shard is written, an ``out`` holding shards of another preparation
    (other images, or more clients): runs trained on them check the content hash on resume
    and evaluation, and could no longer continue. ``same(k, path)``: whether the shard of
    client k may be this command's (the same command again is allowed)."""
    other = []
    for name in sorted(os.listdir(out)) if os.path.isdir(out) else []:
        m = re.fullmatch(r"client_(\d+)\.h5", name)
        if not m:
            continue
        path = os.path.join(out, name)
        try:
            if not same(int(m.group(1)), path):
                other.append(path)
        except ValueError:  # not a shard, or a broken one: not this command's to replace either
            other.append(path)
    refuse_existing(other, "shards of another preparation; runs trained on them could no longer resume or be evaluated")


def _may_hold(path: str, ids: dict[str, list[str]], recipe: Recipe) -> bool:
    """Whether the shard at ``path`` may hold what this preparation writes, told from the
    source's file list before decoding: the planned images (ids) of each split, in order,
    less any that could not be decoded, at the same size. Its pixels are compared
    (content hash) after decoding."""
    info = inspect_shard(path)
    if (info.channels, info.image_size) != (recipe.channels, recipe.size):
        return False
    with h5py.File(path, "r") as f:
        stored = {split: f[split]["ids"].asstr()[()].tolist() for split in ids if "ids" in f[split]}
    kept = {split: set(names) for split, names in stored.items()}  # one set per split: ids of 80k images are quick
    return all(stored[split] == [i for i in ids[split] if i in kept[split]] for split in stored)
