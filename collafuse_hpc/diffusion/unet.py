"""A compact DDPM UNet: GroupNorm residual blocks, sinusoidal time embedding,
self-attention at low resolutions.

Conditioning, all added to the time embedding:
- ``cut_conditioning``: the server's embedding of the client's cut step t_c
  (clients may choose different cuts);
- ``num_classes > 0``: a client's own labels (they never leave the client).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from collafuse_hpc.config import ModelConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps t [N] (any real values) -> [N, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels // 4) or 1, channels)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        self.heads = heads if channels % heads == 0 else 1
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).unbind(1)
        # (B, heads, HW, C/heads) for scaled_dot_product_attention
        h = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class UNet(nn.Module):
    """eps-prediction UNet.

    forward(x [N, C, H, W] float, t [N] int64, t_c [N] int64 | None, y [N] int64 | None)
    -> predicted noise [N, C, H, W].
    """

    def __init__(
        self,
        cfg: ModelConfig,
        in_channels: int,
        image_size: int,
        num_classes: int = 0,
        cut_conditioning: bool = False,
    ):
        super().__init__()
        ch = cfg.base_channels
        emb_dim = 4 * ch
        self.base_channels = ch

        def mlp() -> nn.Sequential:
            return nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        self.time_mlp = mlp()
        self.cut_mlp = mlp() if cut_conditioning else None
        self.class_emb = nn.Embedding(num_classes, emb_dim) if num_classes > 0 else None

        self.stem = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skips, res, cur = [ch], image_size, ch
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                block = nn.ModuleList([ResBlock(cur, ch * mult, emb_dim, cfg.dropout)])
                cur = ch * mult
                if res in cfg.attention_resolutions:
                    block.append(Attention(cur))
                self.down.append(block)
                skips.append(cur)
            if level < len(cfg.channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(cur, cur, 3, stride=2, padding=1)]))
                skips.append(cur)
                res //= 2
        self.mid = nn.ModuleList(
            [ResBlock(cur, cur, emb_dim, cfg.dropout), Attention(cur), ResBlock(cur, cur, emb_dim, cfg.dropout)]
        )
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                block = nn.ModuleList([ResBlock(cur + skips.pop(), ch * mult, emb_dim, cfg.dropout)])
                cur = ch * mult
                if res in cfg.attention_resolutions:
                    block.append(Attention(cur))
                if level > 0 and i == cfg.num_res_blocks:
                    block.append(nn.Upsample(scale_factor=2, mode="nearest"))
                    block.append(nn.Conv2d(cur, cur, 3, padding=1))
                    res *= 2
                self.up.append(block)
        assert not skips
        self.out = nn.Sequential(_norm(cur), nn.SiLU(), nn.Conv2d(cur, in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def _run(self, layers: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        t_c: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.base_channels))
        if self.cut_mlp is not None:
            assert t_c is not None, "this model is conditioned on the cut step t_c"
            emb = emb + self.cut_mlp(timestep_embedding(t_c, self.base_channels))
        if self.class_emb is not None:
            assert y is not None, "this model is conditioned on labels y"
            emb = emb + self.class_emb(y)
        h = self.stem(x)
        hs = [h]
        for block in self.down:
            h = self._run(block, h, emb)
            hs.append(h)
        h = self._run(self.mid, h, emb)
        for block in self.up:
            h = self._run(block, torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)
