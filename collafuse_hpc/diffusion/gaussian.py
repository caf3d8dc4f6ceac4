"""DDPM math in one place, named after the spec's symbols.

Index convention: arrays are indexed by the timestep t = 0..T, with
``betas[0] = 0`` and ``alphas_cumprod[0] = abar_0 = 1``.

Every function takes an *anchor* ``a``: the chain is read as a DDPM whose data
are x_a. Because the forward process is Markov,
``q(x_t | x_a) = N(sqrt(abar_{t|a}) x_a, (1 - abar_{t|a}) I)`` with
``abar_{t|a} = abar_t / abar_a``. Anchor 0 is the ordinary chain (the client's
part); anchor t_c is the server's sub-chain of the Markov-consistent split
(split.py). Strided sampling is just a sparser list of timesteps: the posterior
between any two grid points t > s uses the exact effective beta
``1 - abar_t / abar_s``. Two reverse steps share that math: DDPM's ancestral
step (the posterior q(x_s | x_t, x_a_hat)) and DDIM's family
(:meth:`GaussianDiffusion.ddim_step`; eta 0 deterministic, eta 1 the posterior's
variance), both anchor-aware, so the server's sub-chain and the client's part
use either.

No I/O, no torch.distributed; the model is passed in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

# eps_model(x_t [N, C, H, W], t [N] int64) -> predicted noise [N, C, H, W]
EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# the noise streams of a sampling run: one, one per equal chunk, or (rows, stream) per chunk
Streams = torch.Generator | Sequence[torch.Generator] | Sequence[tuple[int, torch.Generator]] | None


def beta_schedule(name: str, timesteps: int) -> np.ndarray:
    """betas_1..betas_T (float64 [T]) for ``linear`` or ``cosine``.

    ``linear`` is DDPM's 1e-4..0.02 at T = 1000, scaled by 1000 / T so shorter
    chains end at the same noise level (capped at 0.999 for very short chains).
    """
    if name == "linear":
        scale = 1000.0 / timesteps
        return np.linspace(scale * 1e-4, min(scale * 0.02, 0.999), timesteps, dtype=np.float64)
    if name == "cosine":

        def f(t: float) -> float:
            return math.cos((t / timesteps + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - f(t + 1) / f(t), 0.999) for t in range(timesteps)]
        return np.array(betas, dtype=np.float64)
    raise ValueError(f"unknown beta schedule {name!r}; valid: ['linear', 'cosine']")


class GaussianDiffusion:
    """Schedules and the forward/reverse processes of a T-step DDPM.

    Args:
        betas: float64 [T], beta_1..beta_T, each in (0, 1).
    """

    def __init__(self, betas: np.ndarray):
        betas = np.asarray(betas, dtype=np.float64)
        assert betas.ndim == 1 and (betas > 0).all() and (betas < 1).all()
        self.num_timesteps = len(betas)
        self.betas = np.concatenate([[0.0], betas])  # [T + 1]
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = np.cumprod(self.alphas)  # abar_t, abar_0 = 1
        self._abar = torch.from_numpy(self.alphas_cumprod)

    def abar(self, t: torch.Tensor, a: torch.Tensor | int = 0) -> torch.Tensor:
        """abar_{t|a} = abar_t / abar_a as float64 on ``t``'s device, shape of ``t``."""
        table = self._abar.to(t.device)
        a = torch.as_tensor(a, device=t.device)
        return table[t] / table[a]

    @staticmethod
    def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-example float64 [N] (or scalar) -> x.dtype broadcastable to [N, C, H, W]."""
        v = v.to(x.dtype)
        return v.reshape(-1, *([1] * (x.ndim - 1))) if v.ndim else v

    def q_sample(
        self, x_a: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, a: torch.Tensor | int = 0
    ) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_a) = sqrt(abar_{t|a}) x_a + sqrt(1 - abar_{t|a}) noise."""
        abar = self.abar(t, a)
        return self._bcast(abar.sqrt(), x_a) * x_a + self._bcast((1 - abar).sqrt(), x_a) * noise

    def predict_anchor(
        self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, a: torch.Tensor | int = 0
    ) -> torch.Tensor:
        """x_a_hat = (x_t - sqrt(1 - abar_{t|a}) eps) / sqrt(abar_{t|a})."""
        abar = self.abar(t, a)
        return (x_t - self._bcast((1 - abar).sqrt(), x_t) * eps) / self._bcast(abar.sqrt(), x_t)

    def q_posterior(
        self,
        x_a: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        s: torch.Tensor,
        a: torch.Tensor | int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_s | x_t, x_a) for a <= s < t.

        With beta = 1 - abar_t / abar_s (beta_t when s = t - 1):
        mean = sqrt(abar_{s|a}) beta / (1 - abar_{t|a}) x_a
               + sqrt(1 - beta) (1 - abar_{s|a}) / (1 - abar_{t|a}) x_t,
        var  = (1 - abar_{s|a}) / (1 - abar_{t|a}) beta.  var is 0 when s = a.
        """
        abar_t, abar_s = self.abar(t, a), self.abar(s, a)
        beta = 1 - abar_t / abar_s
        coef_a = abar_s.sqrt() * beta / (1 - abar_t)
        coef_t = (1 - beta).sqrt() * (1 - abar_s) / (1 - abar_t)
        mean = self._bcast(coef_a, x_t) * x_a + self._bcast(coef_t, x_t) * x_t
        var = (1 - abar_s) / (1 - abar_t) * beta
        return mean, self._bcast(var, x_t)

    def ddim_step(
        self,
        x_t: torch.Tensor,
        x_a_hat: torch.Tensor,
        t: torch.Tensor,
        s: torch.Tensor,
        a: torch.Tensor | int,
        eta: float,
        noise: torch.Tensor | None,
    ) -> torch.Tensor:
        """DDIM's step t -> s (a <= s < t) given the anchor estimate x_a_hat:

        eps_hat = (x_t - sqrt(abar_{t|a}) x_a_hat) / sqrt(1 - abar_{t|a}),
        sigma^2 = eta^2 (1 - abar_{s|a}) / (1 - abar_{t|a}) (1 - abar_{t|a} / abar_{s|a}),
        x_s = sqrt(abar_{s|a}) x_a_hat + sqrt(1 - abar_{s|a} - sigma^2) eps_hat + sigma noise.

        Every eta keeps q(x_s | x_a) when x_a_hat is exact; eta = 0 is deterministic
        (``noise`` may be None), eta = 1 has the DDPM posterior's variance. At s = a
        it returns x_a_hat.
        """
        abar_t, abar_s = self.abar(t, a), self.abar(s, a)
        eps = (x_t - self._bcast(abar_t.sqrt(), x_t) * x_a_hat) / self._bcast((1 - abar_t).sqrt(), x_t)
        var = eta**2 * (1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)
        x_s = self._bcast(abar_s.sqrt(), x_t) * x_a_hat + self._bcast((1 - abar_s - var).clamp(min=0).sqrt(), x_t) * eps
        if noise is not None:
            x_s = x_s + self._bcast(var.sqrt(), x_t) * noise
        return x_s

    def training_losses(
        self,
        eps_model: EpsModel,
        x_a: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        a: torch.Tensor | int = 0,
    ) -> torch.Tensor:
        """Per-example loss ||eps_model(x_t, t) - noise||^2 (mean over pixels), float [N]."""
        x_t = self.q_sample(x_a, t, noise, a)
        return (eps_model(x_t, t) - noise).float().pow(2).flatten(1).mean(1)

    @torch.inference_mode()
    def p_sample_loop(
        self,
        eps_model: EpsModel,
        x: torch.Tensor,
        timesteps: Sequence[int],
        a: int = 0,
        clip: bool = True,
        generator: Streams = None,
        eta: float | None = None,
    ) -> torch.Tensor:
        """Run the reverse chain from ``timesteps[0]`` down to ``timesteps[-1]``.

        Args:
            x: x at ``timesteps[0]``, [N, C, H, W].
            timesteps: strictly decreasing grid; its last entry must be >= ``a``.
            a: anchor; ``x_a_hat`` is clipped to [-1, 1] only when ``clip``
               (an image at a = 0, never a noised x_c).
            eta: None for DDPM's ancestral steps; a number for DDIM's (0: deterministic).
            generator: the noise's stream; a list of G streams draws the noise of
               x's G equal chunks (G models sampled together), one from each; a list
               of (rows, stream) pairs, chunks of those sizes.
        Returns:
            x at ``timesteps[-1]``; when that is ``a`` the last step is
            deterministic and returns x_a_hat. A grid of fewer than two steps (a
            side with no part of the chain, e.g. the server when the reference
            split hands over at T) returns x as it is.
        """
        if len(timesteps) < 2:
            return x
        assert all(t > s for t, s in zip(timesteps, timesteps[1:])) and timesteps[-1] >= a
        n = x.shape[0]
        for t_i, s_i in zip(timesteps, timesteps[1:]):
            t = torch.full((n,), t_i, device=x.device, dtype=torch.long)
            s = torch.full((n,), s_i, device=x.device, dtype=torch.long)
            x_a = self.predict_anchor(x, t, eps_model(x, t).to(x.dtype), a)
            if clip:
                x_a = x_a.clamp(-1, 1)
            if eta is not None:
                stochastic = eta > 0 and s_i != a
                noise = _randn_like(x, generator) if stochastic else None
                x = self.ddim_step(x, x_a, t, s, a, eta, noise)
                continue
            mean, var = self.q_posterior(x_a, x, t, s, a)
            if s_i == a:
                x = mean
            else:
                x = mean + var.sqrt() * _randn_like(x, generator)
        return x


def _randn_like(x: torch.Tensor, generator: Streams) -> torch.Tensor:
    """Standard normal noise shaped like x [N, ...]: from one stream, or chunk by chunk
    from a list of streams (the same numbers as sampling each chunk alone): G streams
    for G equal chunks, or (rows, stream) pairs for chunks of those sizes."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if isinstance(generator[0], tuple):
        sizes, generator = [rows for rows, _ in generator], [g for _, g in generator]
        chunks = x.split(sizes)
    else:
        chunks = x.split(len(x) // len(generator))
    return torch.cat(
        [torch.randn(c.shape, generator=g, device=x.device, dtype=x.dtype) for c, g in zip(chunks, generator)]
    )
