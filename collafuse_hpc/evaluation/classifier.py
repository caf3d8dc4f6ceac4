"""A domain classifier for scoring small images: an evaluation oracle.

FID's Inception network was trained on 299x299 photographs; on 16x16 digits its
features barely separate the classes, so its FIDs cannot tell a model that draws the
wrong digits from one that draws the right ones. This small CNN is trained once on the
real train images of every client shard of a study (all clients' data together: an
oracle of the evaluation, never part of any client or of training) and saved with its
accuracy on the shards' test images. Its penultimate layer gives features for the
Frechet distance, KID and precision/recall (metrics.py); its predictions give class
fidelity, the share of a client's samples in the classes that client holds.

    collafuse-hpc train-classifier data/study_digits_class/client_*.h5 --out digits_classifier.pt

File: a dict loaded with ``weights_only=True`` (no code runs): ``format``, ``state``
(the network's weights), ``channels``, ``image_size``, ``num_classes``, ``width``,
``accuracy`` and ``per_class_accuracy`` on the test images, ``train_images``,
``test_images``, ``shards`` {path: content_hash}, ``epochs``, ``seed``.
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from collafuse_hpc.atomic import made_folder
from collafuse_hpc.data import ShardReader, inspect_shard
from collafuse_hpc.evaluation.features import file_digest
from collafuse_hpc.runtime.checkpoint import save_atomic

log = logging.getLogger("collafuse_hpc")

FORMAT = "collafuse-classifier-v1"
MAKE = "make one with: collafuse-hpc train-classifier SHARD... --out FILE (the study's shards)"


class DigitClassifier(nn.Module):
    """Three 3x3 conv blocks (GroupNorm, SiLU, 2x2 pooling after the first two), global
    average pooling to ``4 * width`` features, a linear head to ``num_classes`` logits."""

    def __init__(self, channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = channels
        for i, c_out in enumerate((width, 2 * width, 4 * width)):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU()]
            if i < 2:
                layers.append(nn.MaxPool2d(2))
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: float [N, C, H, W] in [-1, 1] -> features [N, 4 * width]."""
        return self.body(x).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _model_range(images: np.ndarray | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    x = torch.as_tensor(images).to(device)
    return x.float() / 127.5 - 1


def _shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by up to 1/8 of its side in x and y (zero padding): the
    augmentation that keeps the classifier from reading pixel positions."""
    pad = max(1, x.shape[-1] // 8)
    padded = F.pad(x, (pad,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    return padded[..., dy : dy + x.shape[-2], dx : dx + x.shape[-1]]


def _read(shards: list[str], split: str) -> tuple[np.ndarray, np.ndarray]:
    parts = [ShardReader(s, split) for s in shards]
    for shard, reader in zip(shards, parts):
        if reader.labels() is None:
            raise ValueError(f"shard {shard!r} has no labels: a classifier needs labelled images")
    images = np.concatenate([r.read(np.arange(len(r)))[0] for r in parts])
    return images, np.concatenate([r.labels() for r in parts]).astype(np.int64)


def train_classifier(
    shards: list[str], out: str, epochs: int = 30, seed: int = 0, batch: int = 128, width: int = 32
) -> dict:
    """Train on the train splits of ``shards``, score on their test splits, save to
    ``out``; returns the saved metadata (without the weights)."""
    images, labels = _read(shards, "train")
    test_images, test_labels = _read(shards, "test")
    info = inspect_shard(shards[0])
    num_classes = int(max(labels.max(), test_labels.max())) + 1
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DigitClassifier(info.channels, num_classes, width)
    optim = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * math.ceil(len(images) / batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=2e-3, total_steps=steps)
    x_all, y_all = _model_range(images, "cpu"), torch.from_numpy(labels)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x_all), generator=generator)
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            loss = F.cross_entropy(model(_shift(x_all[idx], generator)), y_all[idx])
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            schedule.step()
        log.info("classifier epoch %d/%d: loss %.4f", epoch + 1, epochs, loss.item())
    model.eval()
    with torch.inference_mode():
        batches = range(0, len(test_images), 512)
        predicted = torch.cat([model(_model_range(test_images[i : i + 512], "cpu")).argmax(1) for i in batches])
    correct = predicted.numpy() == test_labels
    meta = {
        "format": FORMAT,
        "channels": info.channels,
        "image_size": info.image_size,
        "num_classes": num_classes,
        "width": width,
        "accuracy": float(correct.mean()),
        "per_class_accuracy": [
            float(correct[test_labels == k].mean()) if (test_labels == k).any() else math.nan
            for k in range(num_classes)
        ],
        "train_images": len(images),
        "test_images": len(test_images),
        "shards": {s: inspect_shard(s).content_hash for s in shards},
        "epochs": epochs,
        "seed": seed,
    }
    with made_folder(os.path.dirname(out) or os.curdir):  # gone again when the write fails
        save_atomic(out, {**meta, "state": model.state_dict()})
    return meta


class Classifier:
    """A trained :class:`DigitClassifier` from its file, for scoring uint8 images."""

    def __init__(self, path: str, device: torch.device) -> None:
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ValueError(
                f"classifier file {path!r} not found; make one with collafuse-hpc train-classifier"
            ) from None
        except Exception as e:  # noqa: BLE001 - a foreign or damaged file fails in many ways inside torch
            raise ValueError(
                f"classifier file {path!r} cannot be read ({type(e).__name__}): not a classifier file"
            ) from None
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            raise ValueError(f"{path!r} is not a {FORMAT} file; {MAKE}")
        self.meta = {k: v for k, v in saved.items() if k != "state"}
        self.model = DigitClassifier(saved["channels"], saved["num_classes"], saved["width"]).to(device).eval()
        self.model.load_state_dict(saved["state"])
        self.device = device
        accuracy = self.meta["accuracy"]
        self.identity = f"classifier-{file_digest(path)}-test-accuracy-{accuracy:.4f}"

    def check(self, channels: int, image_size: int) -> None:
        """ValueError unless the images to score are the kind it was trained on."""
        if (channels, image_size) != (self.meta["channels"], self.meta["image_size"]):
            raise ValueError(
                f"the classifier was trained on {self.meta['channels']}x{self.meta['image_size']}px images, but this "
                f"run's images are {channels}x{image_size}px: train one on this run's shards (collafuse-hpc "
                "train-classifier)"
            )

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, C, H, W] -> features float [N, 4 * width]."""
        return self.model.features(_model_range(images, self.device))

    @torch.inference_mode()
    def probabilities(self, images: np.ndarray, batch: int = 512) -> np.ndarray:
        """uint8 [N, C, H, W] -> class probabilities float64 [N, num_classes]."""
        out = [
            F.softmax(self.model(_model_range(images[i : i + batch], self.device)), 1).double().cpu()
            for i in range(0, len(images), batch)
        ]
        return torch.cat(out).numpy()
