"""A compact DDPM UNet: GroupNorm residual blocks, sinusoidal time embedding,
self-attention at low resolutions.

Conditioning, all added to the time embedding:
- ``cut_conditioning``: the server's embedding of the client's cut step t_c
  (clients may choose different cuts);
- ``num_classes > 0``: a client's own labels (they never leave the client).

Members: one UNet object holds K independent models of the same shape (K
clients on one rank train in one step). Every weight has a leading member axis
[K, ...], and activations hold the members side by side in the channel axis,
[N, K*C, H, W], so each convolution is one grouped convolution (groups = K) and
each GroupNorm one call with K times the groups: no per-member loop and no
reshuffling between layers. Row n of the batch is image n of every member. K is
read from the weights at each call, so ``torch.func.functional_call`` with a
subset of the members' weights runs just those members. The server is K = 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from collafuse_hpc.config import ModelConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps t [...] (any real values) -> [..., dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _uniform_fan_in(weight: torch.Tensor, bias: torch.Tensor) -> None:
    """torch's default init of Conv2d and Linear, member by member: weight [K, out, in, ...]."""
    fan_in = weight[0, 0].numel()
    for w, b in zip(weight, bias):
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        nn.init.uniform_(b, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))


class Conv2d(nn.Module):
    """K convolutions side by side: [N, K*Cin, H, W] -> [N, K*Cout, H', W']."""

    def __init__(self, members: int, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, cout, cin, kernel, kernel))
        self.bias = nn.Parameter(torch.empty(members, cout))
        self.stride, self.padding = stride, padding
        with torch.no_grad():
            _uniform_fan_in(self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K, _, cin, kernel, _ = self.weight.shape
        if K > 1 and kernel == 1 and self.stride == 1:  # CPU backends have no grouped 1x1 kernel: a batched matmul
            N, _, H, W = x.shape
            y = torch.matmul(self.weight[..., 0, 0], x.reshape(N, K, cin, H * W))  # (N, K, Cout, HW)
            return (y + self.bias[..., None]).view(N, -1, H, W)
        w = self.weight.flatten(0, 1)  # (K*Cout, Cin, k, k)
        return F.conv2d(x, w, self.bias.flatten(), self.stride, self.padding, groups=K)


class Linear(nn.Module):
    """K linear maps side by side: [N, K*I] -> [N, K*O]."""

    def __init__(self, members: int, cin: int, cout: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, cout, cin))
        self.bias = nn.Parameter(torch.empty(members, cout))
        with torch.no_grad():
            _uniform_fan_in(self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K, _, cin = self.weight.shape
        return (torch.einsum("nki,koi->nko", x.view(len(x), K, cin), self.weight) + self.bias).flatten(1)


class GroupNorm(nn.Module):
    """GroupNorm of each member: [N, K*C, ...] with ``groups`` groups per member."""

    def __init__(self, members: int, channels: int):
        super().__init__()
        self.groups = min(32, channels // 4) or 1
        if channels % self.groups:
            raise ValueError(f"num_channels ({channels}) must be divisible by num_groups ({self.groups})")
        self.weight = nn.Parameter(torch.ones(members, channels))
        self.bias = nn.Parameter(torch.zeros(members, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K = self.weight.shape[0]
        return F.group_norm(x, K * self.groups, self.weight.flatten(), self.bias.flatten())


class Embedding(nn.Module):
    """A class embedding per member: labels [N, K] -> [N, K*E]."""

    def __init__(self, members: int, classes: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, classes, dim))
        with torch.no_grad():
            for w in self.weight:
                nn.init.normal_(w)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        K = self.weight.shape[0]
        return self.weight[torch.arange(K, device=y.device), y].flatten(1)  # (N, K, E) -> (N, K*E)


def _per_member_cat(a: torch.Tensor, b: torch.Tensor, K: int) -> torch.Tensor:
    """Channel concat of [N, K*Ca, H, W] and [N, K*Cb, H, W] within each member."""
    return torch.cat([a.unflatten(1, (K, -1)), b.unflatten(1, (K, -1))], dim=2).flatten(1, 2)


def members_first(x: torch.Tensor, K: int) -> torch.Tensor:
    """[N, K*C, H, W] (the model's layout) -> [K*N, C, H, W] (member k's images at k*N..)."""
    N, _, H, W = x.shape
    return x.view(N, K, -1, H, W).transpose(0, 1).reshape(K * N, -1, H, W)


def members_side_by_side(x: torch.Tensor, K: int) -> torch.Tensor:
    """[K*N, C, H, W] (member k's images at k*N..) -> [N, K*C, H, W] (the model's layout)."""
    _, C, H, W = x.shape
    return x.view(K, -1, C, H, W).transpose(0, 1).reshape(-1, K * C, H, W)


class MemberDropout(nn.Module):
    """Dropout whose mask for member k is drawn from ``streams[k]`` alone, so it does not
    depend on which members share the call, nor on anyone else's draws. ``streams`` is
    the model's list (UNet.streams), set by its owner for the members being run. A
    member's entry is a generator, or blocks ``[(rows, generator), ...]`` of its batch
    (the server: each client's images draw from that client's stream, on any replica)."""

    def __init__(self, p: float, streams: list[torch.Generator]):
        super().__init__()
        self.p, self.streams = p, streams

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return h
        N, KC, H, W = h.shape
        if not self.streams or KC % len(self.streams):
            raise RuntimeError("dropout needs one random stream per member run (Trainable.dropout_streams)")
        C = KC // len(self.streams)
        draws = [_uniform(g, (N, C, H, W), h.device) for g in self.streams]
        return h * (torch.cat(draws, dim=1) >= self.p).to(h.dtype) / (1 - self.p)


def _uniform(stream, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """U[0, 1) of ``shape`` from a generator, or row blocks from ``[(rows, generator), ...]``."""
    if isinstance(stream, torch.Generator):
        return torch.rand(shape, generator=stream, device=device)
    if sum(rows for rows, _ in stream) != shape[0]:
        raise RuntimeError(f"dropout's row blocks {[rows for rows, _ in stream]} do not cover a batch of {shape[0]}")
    return torch.cat([torch.rand((rows, *shape[1:]), generator=g, device=device) for rows, g in stream])


class ResBlock(nn.Module):
    def __init__(self, members: int, cin: int, cout: int, emb_dim: int, dropout: float, streams: list):
        super().__init__()
        self.norm1, self.conv1 = GroupNorm(members, cin), Conv2d(members, cin, cout, 3, padding=1)
        self.emb = Linear(members, emb_dim, cout)
        self.norm2, self.conv2 = GroupNorm(members, cout), Conv2d(members, cout, cout, 3, padding=1)
        self.dropout = MemberDropout(dropout, streams)
        self.skip = Conv2d(members, cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, members: int, channels: int, heads: int = 4):
        super().__init__()
        self.heads = heads if channels % heads == 0 else 1
        self.norm = GroupNorm(members, channels)
        self.qkv = Conv2d(members, channels, 3 * channels, 1)
        self.proj = Conv2d(members, channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, KC, H, W = x.shape
        K = self.qkv.weight.shape[0]
        C = KC // K
        q, k, v = self.qkv(self.norm(x)).reshape(N, K, 3, self.heads, C // self.heads, H * W).unbind(2)
        # (N, K, heads, HW, C/heads) for scaled_dot_product_attention
        h = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(h.transpose(-1, -2).reshape(N, KC, H, W))


class UNet(nn.Module):
    """eps-prediction UNet of ``members`` independent models (module docstring).

    forward(x [N, K*C, H, W] float, t [N, K] int64, t_c [N, K] int64 | None,
    y [N, K] int64 | None) -> predicted noise [N, K*C, H, W]; with K = 1, t, t_c
    and y may also be [N].
    """

    def __init__(
        self,
        cfg: ModelConfig,
        in_channels: int,
        image_size: int,
        num_classes: int = 0,
        cut_conditioning: bool = False,
        members: int = 1,
    ):
        super().__init__()
        ch = cfg.base_channels
        emb_dim = 4 * ch
        self.base_channels = ch
        self.dropout = cfg.dropout
        self.streams: list[torch.Generator] = []  # dropout's, one per member of the next call (MemberDropout)
        K = members

        def mlp() -> nn.Sequential:
            return nn.Sequential(Linear(K, ch, emb_dim), nn.SiLU(), Linear(K, emb_dim, emb_dim))

        self.time_mlp = mlp()
        self.cut_mlp = mlp() if cut_conditioning else None
        self.class_emb = Embedding(K, num_classes, emb_dim) if num_classes > 0 else None

        self.stem = Conv2d(K, in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skips, res, cur = [ch], image_size, ch
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                block = nn.ModuleList([ResBlock(K, cur, ch * mult, emb_dim, cfg.dropout, self.streams)])
                cur = ch * mult
                if res in cfg.attention_resolutions:
                    block.append(Attention(K, cur))
                self.down.append(block)
                skips.append(cur)
            if level < len(cfg.channel_mult) - 1:
                self.down.append(nn.ModuleList([Conv2d(K, cur, cur, 3, stride=2, padding=1)]))
                skips.append(cur)
                res //= 2
        self.mid = nn.ModuleList(
            [
                ResBlock(K, cur, cur, emb_dim, cfg.dropout, self.streams),
                Attention(K, cur),
                ResBlock(K, cur, cur, emb_dim, cfg.dropout, self.streams),
            ]
        )
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                cin = cur + skips.pop()
                block = nn.ModuleList([ResBlock(K, cin, ch * mult, emb_dim, cfg.dropout, self.streams)])
                cur = ch * mult
                if res in cfg.attention_resolutions:
                    block.append(Attention(K, cur))
                if level > 0 and i == cfg.num_res_blocks:
                    block.append(nn.Upsample(scale_factor=2, mode="nearest"))
                    block.append(Conv2d(K, cur, cur, 3, padding=1))
                    res *= 2
                self.up.append(block)
        assert not skips
        self.out = nn.Sequential(GroupNorm(K, cur), nn.SiLU(), Conv2d(K, cur, in_channels, 3, padding=1))
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
        N, K = len(x), self.stem.weight.shape[0]
        emb = self.time_mlp(timestep_embedding(t.reshape(N, K), self.base_channels).flatten(1))
        if self.cut_mlp is not None:
            assert t_c is not None, "this model is conditioned on the cut step t_c"
            emb = emb + self.cut_mlp(timestep_embedding(t_c.reshape(N, K), self.base_channels).flatten(1))
        if self.class_emb is not None:
            assert y is not None, "this model is conditioned on labels y"
            if y.numel() != N * K:  # labels made for another batch than x (reshape's error names neither)
                raise ValueError(f"{y.numel() // K} labels per member for a batch of {N} images")
            emb = emb + self.class_emb(y.reshape(N, K))
        h = self.stem(x)
        hs = [h]
        for block in self.down:
            h = self._run(block, h, emb)
            hs.append(h)
        h = self._run(self.mid, h, emb)
        for block in self.up:
            h = self._run(block, _per_member_cat(h, hs.pop(), K), emb)
        return self.out(h)
