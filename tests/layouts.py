"""Tiny datasets in the official on-disk layouts, made by the tests themselves."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
from PIL import Image


def _jpeg(path: str, w: int, h: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.integers(0, 256, 3)
    img = (base[None, None, :] + 40 * np.sin(xx[..., None] / (3 + seed % 5)) + yy[..., None] % 50).clip(0, 255)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(img.astype(np.uint8)).save(path, quality=90)


CELEBA_NAMES = ["Eyeglasses", "Male", "Smiling", "Wearing_Hat"]


def make_celeba(root: str, n: int = 16) -> np.ndarray:
    """CelebA layout with irregular spacing; returns the attribute matrix (n x 4, 0/1)."""
    rng = np.random.default_rng(0)
    attrs = rng.integers(0, 2, (n, len(CELEBA_NAMES)))
    attrs[0] = [1, 1, 0, 0]  # an image in two attribute groups
    lines = [f"{n}\n", " ".join(CELEBA_NAMES) + " \n"]
    parts = []
    for i in range(n):
        name = f"{i + 1:06d}.jpg"
        _jpeg(os.path.join(root, "img_align_celeba", name), 178, 218, i)
        values = "".join(f" {'1' if a else '-1':>2}" for a in attrs[i])  # " 1" / "-1": uneven gaps
        lines.append(f"{name}{values}\n")
        parts.append(f"{name} {0 if i < n * 3 // 4 else 2}\n")
    with open(os.path.join(root, "list_attr_celeba.txt"), "w") as f:
        f.writelines(lines)
    with open(os.path.join(root, "list_eval_partition.txt"), "w") as f:
        f.writelines(parts)
    return attrs


def make_cub(top: str, n: int = 12, classes: int = 3) -> str:
    """CUB-200-2011 layout under top/CUB_200_2011 (attributes.txt beside it, as in the
    official archive) with two malformed attribute lines; returns the dataset root."""
    root = os.path.join(top, "CUB_200_2011")
    os.makedirs(os.path.join(root, "attributes"), exist_ok=True)
    names = [f"{c + 1:03d}.Bird_{c}" for c in range(classes)]
    rows = {"images": [], "labels": [], "split": [], "boxes": [], "attr": []}
    for i in range(n):
        c = i % classes
        rel = f"{names[c]}/Bird_{c}_{i:04d}_{i}.jpg"
        _jpeg(os.path.join(root, "images", rel), 120, 90, i)
        rows["images"].append(f"{i + 1} {rel}\n")
        rows["labels"].append(f"{i + 1} {c + 1}\n")
        rows["split"].append(f"{i + 1} {1 if i < n * 2 // 3 else 0}\n")
        rows["boxes"].append(f"{i + 1} 20.0 10.0 60.0 50.0\n")
        for a in range(1, 5):
            present = 1 if (i + a) % 3 == 0 else 0
            rows["attr"].append(f"{i + 1} {a} {present} 3 12.5\n")
    rows["attr"][5] = rows["attr"][5].rstrip("\n") + " 0 27.0\n"  # extra fields, as in the real file
    rows["attr"][9] = rows["attr"][9].rstrip("\n") + " 1\n"
    for name, key in (
        ("images.txt", "images"),
        ("image_class_labels.txt", "labels"),
        ("train_test_split.txt", "split"),
        ("bounding_boxes.txt", "boxes"),
    ):
        with open(os.path.join(root, name), "w") as f:
            f.writelines(rows[key])
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.writelines(f"{c + 1} {names[c]}\n" for c in range(classes))
    with open(os.path.join(root, "attributes", "image_attribute_labels.txt"), "w") as f:
        f.writelines(rows["attr"])
    with open(os.path.join(top, "attributes.txt"), "w") as f:
        f.writelines(f"{a} has_part::{a}\n" for a in range(1, 5))
    return root


def _idx(path: str, magic: int, data: np.ndarray, gz: bool) -> None:
    raw = struct.pack(">I", magic) + struct.pack(">" + "I" * data.ndim, *data.shape) + data.tobytes()
    with (gzip.open if gz else open)(path + (".gz" if gz else ""), "wb") as f:
        f.write(raw)


def make_mnist(root: str, gz: bool, n: int = 20) -> None:
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(1)
    for prefix, count in (("train", n), ("t10k", n // 2)):
        _idx(
            os.path.join(root, f"{prefix}-images-idx3-ubyte"), 2051, rng.integers(0, 256, (count, 28, 28), np.uint8), gz
        )
        _idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte"), 2049, (np.arange(count) % 10).astype(np.uint8), gz)


def make_folder(root: str, classes: int = 3, per_class: int = 10) -> None:
    for c in range(classes):
        for i in range(per_class):
            _jpeg(os.path.join(root, f"class_{c}", f"img_{i}.jpg"), 40, 30, c * 100 + i)
