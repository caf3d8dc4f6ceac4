"""Datasets read from their official on-disk layouts into a :class:`Catalog`.

A catalog lists every image of a dataset with its labels, attributes, official
split and where its pixels come from (files to decode, or arrays already in
memory). Parsing is strict about structure (a missing metadata file or a
wrong header is a ValueError naming the file) and lenient where the official
files are known to be irregular (CelebA's spacing, CUB's malformed attribute
lines, which are repaired and counted).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import struct
from dataclasses import dataclass, field

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class Catalog:
    dataset: str
    source: str  # root folder (or package) the images come from
    ids: list[str]  # [N] source file name or id of each image
    channels: int  # 1 or 3 in the shards
    files: list[str] | None = None  # [N] image paths to decode, or None with arrays
    arrays: np.ndarray | None = None  # uint8 [N, H, W] (grey) already decoded
    labels: np.ndarray | None = None  # int64 [N]
    attributes: np.ndarray | None = None  # int8 [N, A], 0/1
    attribute_names: list[str] | None = None  # [A]
    split: np.ndarray | None = None  # [N] official "train" / "test", or None
    boxes: np.ndarray | None = None  # float64 [N, 4] bounding boxes x, y, w, h (pixels)
    notes: list[str] = field(default_factory=list)  # what parsing repaired or assumed

    def __len__(self) -> int:
        return len(self.ids)


def _need(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise ValueError(f"{what}: {path!r} not found; is the dataset root the folder of the official download?")
    return path


def _rows(path: str) -> list[list[str]]:
    with open(path) as f:
        return [line.split() for line in f if line.strip()]


def read_celeba(root: str) -> Catalog:
    """CelebA: ``img_align_celeba/*.jpg``, ``list_attr_celeba.txt`` (count, 40 names,
    then one row of -1/1 per image with irregular spacing), ``list_eval_partition.txt``
    (0 train, 1 val, 2 test; val is counted as train here)."""
    attr_path = _need(os.path.join(root, "list_attr_celeba.txt"), "CelebA attribute file")
    part_path = _need(os.path.join(root, "list_eval_partition.txt"), "CelebA partition file")
    img_dir = _need(os.path.join(root, "img_align_celeba"), "CelebA image folder")
    with open(attr_path) as f:
        lines = [line for line in f if line.strip()]
    try:
        count = int(lines[0].split()[0])
    except (IndexError, ValueError):
        raise ValueError(f"{attr_path!r}: the first line must be the image count") from None
    names = lines[1].split()
    rows = [line.split() for line in lines[2:]]
    if len(rows) != count:
        raise ValueError(f"{attr_path!r}: header says {count} images, the file lists {len(rows)}")
    bad = next((r for r in rows if len(r) != len(names) + 1), None)
    if bad is not None:
        raise ValueError(f"{attr_path!r}: row for {bad[0]!r} has {len(bad) - 1} values, expected {len(names)}")
    ids = [r[0] for r in rows]
    attributes = (np.array([r[1:] for r in rows], dtype=np.int8) > 0).astype(np.int8)
    partition = {r[0]: r[1] for r in _rows(part_path)}
    missing = [i for i in ids if i not in partition]
    if missing:
        raise ValueError(f"{part_path!r} has no partition for {len(missing)} images, e.g. {missing[0]!r}")
    split = np.array(["test" if partition[i] == "2" else "train" for i in ids], dtype=object)
    return Catalog(
        "celeba",
        os.path.abspath(root),
        ids,
        channels=3,
        files=[os.path.join(img_dir, i) for i in ids],
        attributes=attributes,
        attribute_names=names,
        split=split,
    )


def _find(root: str, *candidates: str) -> str | None:
    for c in candidates:
        path = os.path.join(root, c)
        if os.path.exists(path):
            return path
    return None


def read_cub(root: str) -> Catalog:
    """CUB-200-2011: ``images.txt``, ``image_class_labels.txt``, ``train_test_split.txt``,
    ``bounding_boxes.txt``, ``classes.txt``, ``attributes/image_attribute_labels.txt``
    and ``attributes.txt`` (in the root, ``attributes/`` or the folder above).

    Labels are class ids - 1. Attribute lines with extra fields (the official file
    has a few) are repaired by reading the first three fields and counted in notes.
    """
    images = _rows(_need(os.path.join(root, "images.txt"), "CUB image list"))
    ids = [r[1] for r in images]
    index = {r[0]: i for i, r in enumerate(images)}
    n = len(ids)

    def per_image(name: str, what: str, columns: int) -> list[list[str]]:
        rows = _rows(_need(os.path.join(root, name), what))
        out: list[list[str] | None] = [None] * n
        for r in rows:
            if r[0] in index and len(r) >= columns + 1:
                out[index[r[0]]] = r[1 : columns + 1]
        missing = sum(o is None for o in out)
        if missing:
            raise ValueError(f"{os.path.join(root, name)!r} has no row for {missing} of the {n} images")
        return out  # type: ignore[return-value]

    labels = np.array([int(r[0]) - 1 for r in per_image("image_class_labels.txt", "CUB class labels", 1)])
    split = np.array(
        ["train" if r[0] == "1" else "test" for r in per_image("train_test_split.txt", "CUB split", 1)],
        dtype=object,
    )
    boxes = np.array(per_image("bounding_boxes.txt", "CUB bounding boxes", 4), dtype=np.float64)
    _need(os.path.join(root, "classes.txt"), "CUB class names")
    names_path = _find(root, "attributes.txt", "attributes/attributes.txt", "../attributes.txt")
    if names_path is None:
        raise ValueError(f"CUB attribute names: attributes.txt not found in {root!r}, its attributes/ or parent")
    attribute_names = [r[1] for r in _rows(names_path)]
    labels_path = _need(os.path.join(root, "attributes", "image_attribute_labels.txt"), "CUB image attribute labels")
    attributes = np.zeros((n, len(attribute_names)), dtype=np.int8)
    repaired = 0
    with open(labels_path) as f:
        for line in f:
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 5:
                repaired += 1
            image, attribute, present = fields[0], int(fields[1]), fields[2]
            if image in index and 1 <= attribute <= len(attribute_names):
                attributes[index[image], attribute - 1] = present == "1"
    notes = [f"repaired {repaired} malformed line(s) of {labels_path}"] if repaired else []
    image_dir = os.path.join(root, "images")
    return Catalog(
        "cub200",
        os.path.abspath(root),
        ids,
        channels=3,
        files=[os.path.join(image_dir, i) for i in ids],
        labels=labels,
        attributes=attributes,
        attribute_names=attribute_names,
        split=split,
        boxes=boxes,
        notes=notes,
    )


def _read_idx(path: str, magic: int) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or struct.unpack(">I", head)[0] != magic:
                got = struct.unpack(">I", head)[0] if len(head) == 4 else None
                raise ValueError(f"{path!r} is not an IDX file with magic {magic} (got {got})")
            dims = struct.unpack(">" + "I" * (magic & 0xFF), f.read(4 * (magic & 0xFF)))
            data = np.frombuffer(f.read(), dtype=np.uint8)
    except (EOFError, struct.error, gzip.BadGzipFile, OSError) as e:  # cut off, or not gzip after all
        raise ValueError(f"{path!r} is truncated or damaged ({type(e).__name__}: {e}); download it again") from None
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path!r} is truncated: header says {dims}, found {data.size} bytes")
    return data.reshape(dims)


def read_mnist(root: str) -> Catalog:
    """MNIST from the official IDX files (``train-images-idx3-ubyte`` etc., gzipped or not)."""
    parts = []
    for split, prefix in (("train", "train"), ("test", "t10k")):
        found = []
        for kind, magic in (("images-idx3-ubyte", 2051), ("labels-idx1-ubyte", 2049)):
            name = f"{prefix}-{kind}"
            path = _find(root, name, name + ".gz")
            if path is None:
                raise ValueError(f"MNIST file {name}[.gz] not found in {root!r}")
            found.append(_read_idx(path, magic))
        images, labels = found
        if len(images) != len(labels):
            raise ValueError(f"MNIST {split}: {len(images)} images but {len(labels)} labels in {root!r}")
        parts.append((split, images, labels))
    ids = [f"{split}/{i}" for split, images, _ in parts for i in range(len(images))]
    return Catalog(
        "mnist",
        os.path.abspath(root),
        ids,
        channels=1,
        arrays=np.concatenate([p[1] for p in parts]),
        labels=np.concatenate([p[2] for p in parts]).astype(np.int64),
        split=np.array([split for split, images, _ in parts for _ in range(len(images))], dtype=object),
    )


def read_folder(root: str) -> Catalog:
    """Images in ``root/<class>/*`` (labels = sorted class folders) or flat in ``root``."""
    if not os.path.isdir(root):
        raise ValueError(f"image folder {root!r} not found")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    groups = [(c, os.path.join(root, c)) for c in classes] or [(None, root)]
    ids, labels = [], []
    for label, (name, folder) in enumerate(groups):
        for fname in sorted(os.listdir(folder)):
            if fname.lower().endswith(IMAGE_EXTENSIONS):
                ids.append(os.path.join(name, fname) if name else fname)
                labels.append(label)
    if not ids:
        raise ValueError(f"image folder {root!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return Catalog(
        "folder",
        os.path.abspath(root),
        ids,
        channels=3,
        files=[os.path.join(root, i) for i in ids],
        labels=np.array(labels, dtype=np.int64) if classes else None,
        notes=[f"classes: {classes}"] if classes else [],
    )


def read_digits() -> Catalog:
    """The 1,797 8x8 handwritten digits (17 grey levels) bundled in scikit-learn's wheel.

    Read from the wheel's ``datasets/data/digits.csv.gz`` (64 pixels then the label per
    row, as ``sklearn.datasets.load_digits`` reads it) without importing scikit-learn,
    whose import alone costs a second of CPU in every process that prepares the digits."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.loader is None:  # loader None: a stray sklearn/ folder, not the package
        raise ValueError("the digits data ship with scikit-learn: pip install 'collafuse-hpc[quickstart]'")
    found = [
        path
        for folder in spec.submodule_search_locations or []
        if os.path.isfile(path := os.path.join(folder, "datasets", "data", "digits.csv.gz"))
    ]
    if found:
        table = np.loadtxt(found[0], delimiter=",")  # (1797, 65): pixels 0..16, then the label
    else:  # not a plain folder (an editable or zipped install): scikit-learn's own reader
        from sklearn.datasets import load_digits

        digits = load_digits()
        table = np.concatenate([digits.data, digits.target[:, None]], axis=1)
    return Catalog(
        "sklearn-digits",
        "sklearn.datasets.load_digits (UCI optical recognition of handwritten digits)",
        [str(i) for i in range(len(table))],
        channels=1,
        arrays=(table[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)).round().astype(np.uint8),
        labels=table[:, -1].astype(np.int64),
    )


SOURCES = {"celeba": read_celeba, "cub": read_cub, "mnist": read_mnist, "folder": read_folder}
