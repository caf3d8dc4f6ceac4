"""Feature extractors for FID/KID, loaded from local files only.

- ``inception``: the Inception-v3 used for FID (the TensorFlow graph of
  2015-12-05), 2048 pool features. Accepted files:
    * TorchScript, as used by StyleGAN's and clean-fid's tools
      (``inception-2015-12-05.pt``): called as ``model(x, return_features=True)``
      on images in [0, 255];
    * a PyTorch state dict in torchvision's Inception3 layout, as pytorch-fid
      ships it (``pt_inception-2015-12-05-6726825d.pth``), loaded into
      :class:`FIDInceptionV3` (images resized to 299x299 and scaled to [-1, 1]).
  Compute nodes have no internet: nothing is ever downloaded. The path comes
  from ``eval.inception_path`` or the environment variable ``COLLAFUSE_INCEPTION``.
- ``pixels``: the images themselves (bilinear-resized to at most 32x32, in [-1, 1])
  as features. Needs no weights; a proxy for quick checks and tests, not
  comparable with published FIDs.

Real-image features are cached per shard under the shard's content hash, so a
sweep computes them once.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ENV_VAR = "COLLAFUSE_INCEPTION"
STAGE_HINT = (
    "stage the FID Inception weights on a filesystem the compute nodes can read (they have no internet): "
    "on a login node download 'pt_inception-2015-12-05-6726825d.pth' (pytorch-fid's release) or "
    "'inception-2015-12-05.pt' (the TorchScript file of StyleGAN/clean-fid), copy it to the cluster, and set "
    f"eval.inception_path or {ENV_VAR} to its path (README: Evaluation)"
)


class _Conv(nn.Sequential):
    """Conv (no bias) + BatchNorm (eps 1e-3) + ReLU; keys ``conv.*`` and ``bn.*``."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)
        self.relu = nn.ReLU()


def _avg3(x: torch.Tensor) -> torch.Tensor:
    """The TF graph's 3x3 average pool: padding not counted."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _BlockA(nn.Module):  # Mixed_5b..5d
    def __init__(self, cin: int, pool: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = _Conv(cin, 48, 1), _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = _Conv(64, 96, 3, padding=1), _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool, 1)

    def forward(self, x):
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_avg3(x)),
            ],
            1,
        )


class _BlockB(nn.Module):  # Mixed_6a: grid reduction 35 -> 17
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = _Conv(64, 96, 3, padding=1), _Conv(96, 96, 3, stride=2)

    def forward(self, x):
        dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), dbl, F.max_pool2d(x, 3, stride=2)], 1)


class _BlockC(nn.Module):  # Mixed_6b..6e: factorized 7x7
    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2, self.branch7x7_3 = (
            _Conv(cin, c7, 1),
            _Conv(c7, c7, **row),
            _Conv(c7, 192, **col),
        )
        self.branch7x7dbl_1 = _Conv(cin, c7, 1)
        self.branch7x7dbl_2, self.branch7x7dbl_3 = _Conv(c7, c7, **col), _Conv(c7, c7, **row)
        self.branch7x7dbl_4, self.branch7x7dbl_5 = _Conv(c7, c7, **col), _Conv(c7, 192, **row)
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class _BlockD(nn.Module):  # Mixed_7a: grid reduction 17 -> 8
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = _Conv(cin, 192, 1), _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class _BlockE(nn.Module):  # Mixed_7b (average pool) and Mixed_7c (max pool, as in the TF graph)
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = (
            _Conv(384, 384, (1, 3), padding=(0, 1)),
            _Conv(384, 384, (3, 1), padding=(1, 0)),
        )
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _Conv(cin, 448, 1), _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 as in the FID TensorFlow graph, up to the 2048-d pool features.

    forward(images [N, 3, H, W] in [-1, 1]) -> features [N, 2048]; images are
    resized to 299x299 (bilinear). Parameter names follow torchvision's
    Inception3, so pytorch-fid's state dict loads (its ``fc`` is ignored)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _BlockA(192, 32), _BlockA(256, 64), _BlockA(288, 64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b, self.Mixed_6c = _BlockC(768, 128), _BlockC(768, 160)
        self.Mixed_6d, self.Mixed_6e = _BlockC(768, 160), _BlockC(768, 192)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b, self.Mixed_7c = _BlockE(1280, max_pool=False), _BlockE(2048, max_pool=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean((2, 3))


# images [N, C, H, W] float in [-1, 1] -> features float [N, D]
Extractor = Callable[[torch.Tensor], torch.Tensor]


def inception_path(configured: str) -> str:
    """The weights file from the config or $COLLAFUSE_INCEPTION; ValueError saying how to stage it."""
    path = configured or os.environ.get(ENV_VAR, "")
    if not path:
        raise ValueError(f"eval.extractor is 'inception' but no weights file is given: {STAGE_HINT}")
    if not os.path.isfile(path):
        raise ValueError(f"Inception weights file {path!r} not found: {STAGE_HINT}")
    return path


def load_extractor(name: str, path: str, device: torch.device) -> tuple[Extractor, str]:
    """(extractor, identity); the identity names the features in caches and results."""
    if name == "pixels":

        def pixels(x: torch.Tensor) -> torch.Tensor:
            if x.shape[-1] > 32:
                x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
            return x.flatten(1)

        return pixels, "pixels"
    path = inception_path(path)
    identity = f"inception-{_file_digest(path)}"
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated for new models; FID tools ship it
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted = torch.jit.load(path, map_location=device).eval()
    except RuntimeError:
        scripted = None
    if scripted is not None:

        @torch.inference_mode()
        def torchscript(x: torch.Tensor) -> torch.Tensor:
            rgb = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            return scripted((rgb + 1) * 127.5, return_features=True).float()

        return torchscript, identity
    model = FIDInceptionV3()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"{path!r} is neither TorchScript nor a PyTorch state dict ({e}); {STAGE_HINT}") from None
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "AuxLogits."))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]  # not in converted TF weights
    if missing or unexpected:
        raise ValueError(
            f"{path!r} is not the FID Inception-v3 state dict: {len(missing)} weights missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}); {STAGE_HINT}"
        )
    model = model.to(device).eval()

    @torch.inference_mode()
    def inception(x: torch.Tensor) -> torch.Tensor:
        return model(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x).float()

    return inception, identity


def _file_digest(path: str) -> str:
    """Short sha256 of a file (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def features(extract: Extractor, images: torch.Tensor, batch: int, device: torch.device) -> np.ndarray:
    """Features float64 [N, D] of images [N, C, H, W] in [-1, 1], ``batch`` at a time on ``device``."""
    out = [extract(images[i : i + batch].to(device).float()).double().cpu() for i in range(0, len(images), batch)]
    return torch.cat(out).numpy()


def cached_real_features(cache_dir: str, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """Load ``<cache_dir>/<key>.npy`` or compute and store it (atomically)."""
    path = os.path.join(cache_dir, f"{key}.npy")
    if os.path.exists(path):
        return np.load(path)
    value = compute()
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, value)
    os.replace(tmp, path)
    return value
