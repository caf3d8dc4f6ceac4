"""K models of one shape with their AdamW state and EMA copies: the unit each
role trains, samples with and checkpoints (the server is K = 1; a client rank
holds one per model shape of the clients it hosts).

Every weight has a leading member axis (unet.py). The optimizer is AdamW written
out per member, so members step independently: a round that trains only some of
them (partial participation) leaves the others' weights, moments, step counts
and EMA exactly as they were, and gradient clipping takes each member's own norm.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call

from collafuse_hpc.config import OptimConfig

BETAS, EPS = (0.9, 0.999), 1e-8  # AdamW's (torch's defaults)


class Trainable:
    """Owns ``model`` (K members, moved to ``device``), per-member AdamW moments and
    step counts and an EMA copy of the weights. On CUDA the weights and inputs are
    channels_last and the forward runs under bf16 autocast; ``compile`` wraps
    both copies in torch.compile (runs of all members).

    Args:
        members: K, the length of every weight's leading axis.
    """

    def __init__(self, model: nn.Module, cfg: OptimConfig, device: torch.device, compile: bool = False):
        self.cfg = cfg
        self.device = device
        self.cuda = device.type == "cuda"
        self.model = model.to(device)
        if self.cuda:  # convolution weights [K, Cout, Cin, k, k] laid out so that [K*Cout, ...] is channels_last
            for p in self.model.parameters():
                if p.dim() == 5:
                    p.data = p.data.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.params = dict(self.model.named_parameters())
        self.members = next(iter(self.params.values())).shape[0]
        self.exp_avg = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.exp_avg_sq = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.steps = torch.zeros(self.members, dtype=torch.int64)  # optimizer steps per member
        self._run_model = torch.compile(self.model) if compile else self.model
        self._run_ema = torch.compile(self.ema) if compile else self.ema

    def _all(self, members: Sequence[int] | None) -> bool:
        return members is None or list(members) == list(range(self.members))

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, ema: bool = False, members: Sequence[int] | None = None, **cond
    ) -> torch.Tensor:
        """Predicted noise of the ``members`` (default all) for x [N, K'*C, H, W] at steps
        t [N, K'] (unet.py's layout); ``ema`` uses the sampling copy. ``cond`` goes to
        the model (t_c, y). Returns float32 on CUDA too."""
        if self.cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        context = torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()
        with context:
            if self._all(members):
                eps = (self._run_ema if ema else self._run_model)(x, t, **cond)
            else:  # a subset: the same module with those members' weights
                module = self.ema if ema else self.model
                index = torch.tensor(list(members), device=self.device)
                weights = {n: p.index_select(0, index) for n, p in module.named_parameters()}
                eps = functional_call(module, weights, (x, t), cond)
        return eps.float()

    def step(
        self,
        loss: torch.Tensor | None,
        members: Sequence[int] | None = None,
        reduce: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        """Backward, reduce, clip, AdamW step and EMA update (with warm-up) of ``members``
        (default all); the others stay as they are. ``loss``: the sum of the members'
        losses (their gradients do not mix).

        ``reduce`` sums the flattened gradients in place across replicas (a
        server group); ``loss`` may then be None for a replica with no data this
        round, which contributes zeros and still steps with the others.
        """
        for p in self.params.values():
            p.grad = None
        if loss is not None:
            loss.backward()
        grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in self.params.items()}
        for p in self.params.values():
            p.grad = None
        if reduce is not None:
            flat = torch.cat([g.reshape(-1) for g in grads.values()])
            reduce(flat)
            grads = dict(zip(grads, flat.split([g.numel() for g in grads.values()])))
            grads = {n: g.view_as(self.params[n]) for n, g in grads.items()}
        rows = None if self._all(members) else torch.tensor(list(members), device=self.device)
        with torch.no_grad():
            self._update(grads, rows)

    def _update(self, grads: dict[str, torch.Tensor], rows: torch.Tensor | None) -> None:
        """Clip, AdamW and EMA on the members ``rows`` (None: all), as torch's
        clip_grad_norm_ and AdamW compute them for each member on its own."""

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t if rows is None else t.index_select(0, rows)

        def put(target: torch.Tensor, value: torch.Tensor) -> None:
            if rows is not None:
                target.index_copy_(0, rows, value)

        cfg = self.cfg
        g = {n: pick(grads[n]) for n in self.params}
        k = len(next(iter(g.values())))
        steps_cpu = self.steps if rows is None else self.steps.index_select(0, rows.cpu())
        steps_cpu = steps_cpu + 1
        if rows is None:
            self.steps.copy_(steps_cpu)
        else:
            self.steps.index_copy_(0, rows.cpu(), steps_cpu)
        steps = steps_cpu.to(self.device, torch.float64)
        if cfg.grad_clip > 0:
            norm = torch.stack([x.reshape(k, -1).float().pow(2).sum(1) for x in g.values()]).sum(0).sqrt()
            coef = (cfg.grad_clip / (norm + 1e-6)).clamp(max=1.0)
            g = {n: x * coef.view(k, *([1] * (x.ndim - 1))).to(x.dtype) for n, x in g.items()}
        b1, b2 = BETAS
        step_size = cfg.lr / (1 - b1**steps)  # [k]
        bias2_sqrt = (1 - b2**steps).sqrt()
        decay = torch.minimum(torch.full_like(steps, cfg.ema_decay), (1 + steps) / (10 + steps))
        for n, p in self.params.items():
            shape = (k, *([1] * (p.ndim - 1)))
            w, m, v, e = pick(p.data), pick(self.exp_avg[n]), pick(self.exp_avg_sq[n]), pick(self.ema_params[n])
            w.mul_(1 - cfg.lr * cfg.weight_decay)
            m.lerp_(g[n], 1 - b1)
            v.mul_(b2).addcmul_(g[n], g[n], value=1 - b2)
            denom = (v.sqrt() / bias2_sqrt.view(shape).to(v.dtype)).add_(EPS)
            w.sub_(step_size.view(shape).to(w.dtype) * m / denom)
            e.lerp_(w, (1 - decay).view(shape).to(e.dtype))
            for target, value in ((p.data, w), (self.exp_avg[n], m), (self.exp_avg_sq[n], v), (self.ema_params[n], e)):
                put(target, value)

    @property
    def ema_params(self) -> dict[str, torch.Tensor]:
        return dict(self.ema.named_parameters())

    def member_state(self, j: int) -> dict:
        """Member ``j``'s weights, EMA, moments and step count, as a model of its own:
        the same whatever the member's place (a client's checkpoint)."""
        ema = self.ema_params

        def one(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {n: t[j].detach().clone() for n, t in d.items()}

        return {
            "model": one(self.params),
            "ema": one(ema),
            "exp_avg": one(self.exp_avg),
            "exp_avg_sq": one(self.exp_avg_sq),
            "steps": int(self.steps[j]),
        }

    def load_member_state(self, j: int, state: dict) -> None:
        """Put a :meth:`member_state` into member ``j``; KeyError or RuntimeError
        when it does not fit this model."""
        ema = self.ema_params
        with torch.no_grad():
            for key, target in (
                ("model", self.params),
                ("ema", ema),
                ("exp_avg", self.exp_avg),
                ("exp_avg_sq", self.exp_avg_sq),
            ):
                saved = state[key]
                if set(saved) != set(target):
                    missing, unexpected = sorted(set(target) - set(saved)), sorted(set(saved) - set(target))
                    raise KeyError(f"{key}: missing {missing[:3]}, unexpected {unexpected[:3]}")
                for n, t in target.items():
                    if saved[n].shape != t.shape[1:]:
                        raise RuntimeError(
                            f"size mismatch for {n}: saved {tuple(saved[n].shape)}, model {tuple(t.shape[1:])}"
                        )
                    t[j].copy_(saved[n])
        self.steps[j] = int(state["steps"])
