"""A model with its AdamW optimizer and EMA copy: the unit each role trains,
samples with and checkpoints."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import torch
from torch import nn

from collafuse_hpc.config import OptimConfig


class Trainable:
    """Owns ``model`` (moved to ``device``), an AdamW optimizer and an EMA of the
    weights. On CUDA the weights and inputs are channels_last and the forward
    runs under bf16 autocast; ``compile`` wraps both copies in torch.compile.

    The checkpointed state is always the plain module's (compiled or not).
    """

    def __init__(self, model: nn.Module, cfg: OptimConfig, device: torch.device, compile: bool = False):
        self.cfg = cfg
        self.device = device
        self.cuda = device.type == "cuda"
        memory_format = torch.channels_last if self.cuda else torch.contiguous_format
        self.model = model.to(device, memory_format=memory_format)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.steps = 0
        self._run_model = torch.compile(self.model) if compile else self.model
        self._run_ema = torch.compile(self.ema) if compile else self.ema

    def forward(self, x: torch.Tensor, t: torch.Tensor, ema: bool = False, **cond) -> torch.Tensor:
        """Predicted noise for x [N, C, H, W] at steps t [N]; ``ema`` uses the sampling copy.
        ``cond`` goes to the model (t_c, y). Returns float32 on CUDA too."""
        if self.cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        context = torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()
        with context:
            eps = (self._run_ema if ema else self._run_model)(x, t, **cond)
        return eps.float()

    def step(self, loss: torch.Tensor | None, reduce: Callable[[torch.Tensor], None] | None = None) -> None:
        """Backward, reduce, clip, optimizer step, EMA update with warm-up.

        ``reduce`` sums the flattened gradients in place across replicas (a
        server group); ``loss`` may then be None for a replica with no data this
        round, which contributes zeros and still steps with the others.
        """
        self.opt.zero_grad(set_to_none=True)
        if loss is not None:
            loss.backward()
        if reduce is not None:
            params = list(self.model.parameters())
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
            reduce(flat)
            offset = 0
            for p in params:
                p.grad = flat[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
        if self.cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.steps += 1
        decay = min(self.cfg.ema_decay, (1 + self.steps) / (10 + self.steps))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.model.parameters()):
                e.lerp_(p, 1 - decay)
            for e, b in zip(self.ema.buffers(), self.model.buffers()):
                e.copy_(b)

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "opt": self.opt.state_dict(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.steps = int(state["steps"])
