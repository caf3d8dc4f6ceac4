"""K models of one shape with their AdamW state and EMA copies: the unit each
role trains, samples with and checkpoints (the server is K = 1; a client rank
holds one per model shape of the clients it hosts).

Every weight has a leading member axis (unet.py), and every weight is a view of
one (K, P) buffer whose row j holds member j's weights. The optimizer is torch's
fused AdamW kernel applied to each member's row with that member's step count, so
members step independently: a round that trains only some of them (partial
participation) leaves the others' weights, moments, step counts and EMA exactly
as they were, and gradient clipping takes each member's own norm.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call

from collafuse_hpc.config import OptimConfig

BETAS, EPS = (0.9, 0.999), 1e-8  # AdamW's (torch's defaults)
# The gradients are deliberately views of one (K, P) buffer, strided like the weights they belong to.
LAYOUT_WARNING = "grad and param do not obey the gradient layout contract"
_quiet_lock, _quiet = threading.Lock(), {"depth": 0, "entry": None}


@contextlib.contextmanager
def _no_layout_warning():
    """Silence LAYOUT_WARNING while a backward runs, and only then. Roles of an
    in-process run step in threads at once, and warnings.catch_warnings is not
    thread-safe: the first one in installs the filter, the last one out removes it."""
    with _quiet_lock:
        if _quiet["depth"] == 0:
            warnings.filterwarnings("ignore", message=LAYOUT_WARNING)
            _quiet["entry"] = warnings.filters[0]
        _quiet["depth"] += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet["depth"] -= 1
            if _quiet["depth"] == 0 and _quiet["entry"] in warnings.filters:
                warnings.filters.remove(_quiet["entry"])
                warnings._filters_mutated()  # the interpreter caches filter lookups


class Trainable:
    """Owns ``model`` (K members, moved to ``device``), per-member AdamW moments and
    step counts and an EMA copy of the weights. On CUDA the inputs are channels_last
    and the forward runs under bf16 autocast; ``compile`` wraps both copies in
    torch.compile (runs of all members). K is the leading axis of ``model``'s weights.
    """

    def __init__(self, model: nn.Module, cfg: OptimConfig, device: torch.device, compile: bool = False):
        self.cfg = cfg
        self.device = device
        self.cuda = device.type == "cuda"
        self.model = model.to(device)
        self.weights = _flatten(self.model)  # (K, P): member j's weights are row j
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.ema_weights = _flatten(self.ema)
        self.members = len(self.weights)
        self.params = dict(self.model.named_parameters())
        self.grad, self.exp_avg, self.exp_avg_sq = (torch.zeros_like(self.weights) for _ in range(3))
        self._grads = _views(self.grad, self.params)  # each weight's .grad during step: autograd adds into them
        # optimizer steps per member, float32 scalars on the device as the fused kernel reads them
        self.steps = [torch.zeros((), device=device) for _ in range(self.members)]
        # each member's dropout stream, set by the member's owner (a client, the server)
        self.dropout_streams: list[torch.Generator | None] = [None] * self.members
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
        run = range(self.members) if members is None else members
        streams = [self.dropout_streams[j] for j in run]
        self.model.streams[:] = [] if None in streams else streams
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
        self.grad.zero_()
        for p, g in zip(self.params.values(), self._grads.values()):
            p.grad = g
        if loss is not None:
            with _no_layout_warning():
                loss.backward()
        if reduce is not None:
            reduce(self.grad.view(-1))
        with torch.no_grad():
            self._update(list(range(self.members)) if members is None else list(members))

    def _update(self, members: list[int]) -> None:
        """Clip, AdamW and EMA of ``members``, as torch's clip_grad_norm_ and AdamW
        compute them for each member on its own (one row of the flat buffers each)."""
        cfg = self.cfg
        if cfg.grad_clip > 0:  # members not stepping have zero gradients: their factor does not matter
            coef = (cfg.grad_clip / (torch.linalg.vector_norm(self.grad, dim=1) + 1e-6)).clamp(max=1.0)
            self.grad.mul_(coef[:, None])
        rows = [self.steps[j] for j in members]
        torch._foreach_add_(rows, 1)
        b1, b2 = BETAS
        torch._fused_adamw_(
            [self.weights[j] for j in members],
            [self.grad[j] for j in members],
            [self.exp_avg[j] for j in members],
            [self.exp_avg_sq[j] for j in members],
            [],
            rows,
            lr=cfg.lr,
            beta1=b1,
            beta2=b2,
            weight_decay=cfg.weight_decay,
            eps=EPS,
            amsgrad=False,
            maximize=False,
        )
        by_decay: dict[float, list[int]] = {}  # EMA with warm-up: members at one step count share a decay
        for j in members:
            n = float(self.steps[j])
            by_decay.setdefault(min(cfg.ema_decay, (1 + n) / (10 + n)), []).append(j)
        for decay, group in by_decay.items():
            if len(group) == self.members:
                self.ema_weights.lerp_(self.weights, 1 - decay)
            else:
                torch._foreach_lerp_([self.ema_weights[j] for j in group], [self.weights[j] for j in group], 1 - decay)

    def set_member_weights(self, j: int, flat: torch.Tensor) -> None:
        """Member ``j``'s weights become ``flat`` [P] (its moments, step count and EMA stay:
        a federated client starting a round from the global model)."""
        with torch.no_grad():
            self.weights[j].copy_(flat)

    def restart_member(self, j: int, flat: torch.Tensor) -> None:
        """Member ``j`` starts afresh from ``flat`` [P]: weights and EMA set to it, moments
        and step count zeroed (so the EMA's warm-up runs again)."""
        with torch.no_grad():
            self.weights[j].copy_(flat)
            self.ema_weights[j].copy_(flat)
            self.exp_avg[j].zero_()
            self.exp_avg_sq[j].zero_()
        self.steps[j].zero_()

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
            "exp_avg": one(_views(self.exp_avg, self.params)),
            "exp_avg_sq": one(_views(self.exp_avg_sq, self.params)),
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
                ("exp_avg", _views(self.exp_avg, self.params)),
                ("exp_avg_sq", _views(self.exp_avg_sq, self.params)),
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
        self.steps[j].fill_(int(state["steps"]))


def _views(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Views of a (K, P) buffer shaped like the weights ``like``, in order."""
    out, offset = {}, 0
    for name, p in like.items():
        size = p[0].numel()
        out[name] = flat[:, offset : offset + size].view(p.shape)
        offset += size
    return out


def _flatten(module: nn.Module) -> torch.Tensor:
    """Move ``module``'s weights into one (K, P) buffer, member j's in row j, and make
    each weight a view of it: the optimizer then runs on K rows, not on every weight
    of every member."""
    params = dict(module.named_parameters())
    K = next(iter(params.values())).shape[0]
    flat = torch.cat([p.detach().reshape(K, -1) for p in params.values()], dim=1)
    for p, view in zip(params.values(), _views(flat, params).values()):
        p.data = view
    return flat
