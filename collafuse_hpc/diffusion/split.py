"""The split at the cut: which part of the chain each side owns.

A thin layer over gaussian.py. For a client with cut step t_c:

- the client trains on t in 1..t_c (anchor 0) and sends
  x_c = q_sample(x_0, t_c) to the server;
- the server trains on t in t_c+1..T. In the ``markov`` split (default) it
  continues the chain from x_c with anchor t_c, which gives x_t the exact
  marginal q(x_t | x_0). In the ``reference`` split (the authors' code) it
  re-noises x_c as if it were clean data (anchor 0), and sampling hands over
  at the heuristic step t_c + t_c (1 - c) instead of t_c.
- sampling: the server runs the grid from T down to the hand-over step h; the
  client runs h down to 0. One clipping rule for both sides: the estimate
  x_a_hat is clipped to [-1, 1] exactly when it estimates the clean image x_0
  (:attr:`Cut.server_clips`): always on the client, on the server only at c = 0
  (otherwise its estimate is x_c, a noised image). When the reference split's
  hand-over reaches T, the server has no step to run and returns x_T as it is.

:meth:`Cut.for_client` is the one place a client's config becomes its cut (the
rounding rule, the split mode, the default step count); every role, the
evaluation and the benchmarks take their cut from it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from collafuse_hpc.config import ClientConfig, Config


@dataclass(frozen=True)
class Cut:
    """One client's cut. ``t_c`` in [0, T]; ``mode`` is ``markov`` or ``reference``;
    ``steps``: reverse steps of a whole sampling run (0: T, every step); ``eta``:
    None for DDPM steps, else DDIM's eta (both sides sample the same way)."""

    t_c: int
    timesteps: int
    mode: str = "markov"
    steps: int = 0
    eta: float | None = None

    @classmethod
    def for_client(cls, cfg: Config, index: int) -> Cut:
        """Client ``index``'s cut under ``cfg``; ValueError naming the key for a cut of 0
        without ``allow_centralized`` or a sampling grid that cannot be built."""
        c, d = cfg.clients[index], cfg.diffusion
        eta = d.eta if d.sampler == "ddim" else None
        cut = cls(cut_step(c, d.timesteps), d.timesteps, d.split, d.sampling_steps, eta)
        if cut.t_c == 0 and not c.allow_centralized:
            raise ValueError(
                f"client {c.id!r} ('clients.{index}') has cut 0: the server would see raw images. "
                f"Set 'clients.{index}.allow_centralized: true' to opt in to this centralized baseline"
            )
        try:
            cut.sampling_grids()
        except ValueError as e:
            raise ValueError(f"config key 'diffusion.sampling_steps' for client {c.id!r}: {e}") from None
        return cut

    def full_chain(self) -> Cut:
        """The whole chain on the client (c = 1) with the same step count: what the
        client's model does alone, the baseline of client compute and quality."""
        return replace(self, t_c=self.timesteps)

    @property
    def ratio(self) -> float:
        """c = t_c / T, the fraction of steps done on the client."""
        return self.t_c / self.timesteps

    @property
    def uses_server(self) -> bool:
        """False for c = 1 (local only): nothing is sent."""
        return self.t_c < self.timesteps

    @property
    def server_anchor(self) -> int:
        """Anchor of the server's chain: t_c (markov) or 0 (reference)."""
        return self.t_c if self.mode == "markov" else 0

    @property
    def handover(self) -> int:
        """Step h at which sampling passes from server to client."""
        if self.mode == "markov" or not self.uses_server:
            return self.t_c
        return min(self.timesteps, int(round(self.t_c + self.t_c * (1 - self.ratio))))

    @property
    def server_clips(self) -> bool:
        """Whether the server's x_a_hat is clipped: only when it estimates x_0 (t_c = 0)."""
        return self.t_c == 0

    @property
    def client_train_steps(self) -> tuple[int, int]:
        """Inclusive range of t the client trains on: 1..t_c (empty when t_c = 0)."""
        return 1, self.t_c

    def sampling_grids(self, steps: int | None = None) -> tuple[list[int], list[int]]:
        """Strictly decreasing timestep grids (server, client) for ``steps`` reverse
        steps (default: the cut's own ``steps``, 0 meaning T).

        The server grid runs T..h, the client grid h..0; h is on both, and each
        side gets a share of the steps about in proportion to its part of the
        chain (every step when ``steps == T``). A side with no part gets [].
        """
        T, h = self.timesteps, self.handover
        steps = (self.steps if steps is None else steps) or T
        both = 0 < h < T
        if not (2 if both else 1) <= steps <= T:
            low = 2 if both else 1
            raise ValueError(f"sampling steps must be in [{low}, {T}] for hand-over step {h}, got {steps}")
        n_client = min(h, max(1, round(steps * h / T))) if h > 0 else 0
        n_server = min(T - h, max(1, steps - n_client)) if h < T else 0
        if h > 0:
            n_client = min(h, steps - n_server)
        server = _grid(T, h, n_server) if n_server else []
        client = _grid(h, 0, n_client) if n_client else []
        return server, client


def cuts(cfg: Config) -> list[Cut]:
    """Every client's cut, in config order (checks them all: see :meth:`Cut.for_client`)."""
    return [Cut.for_client(cfg, k) for k in range(len(cfg.clients))]


def cut_step(client: ClientConfig, timesteps: int) -> int:
    """t_c = round(c * T), or the configured cut_step: the rounding rule."""
    if client.cut_step is not None:
        return client.cut_step
    return int(round(client.cut_ratio * timesteps))


def _grid(start: int, stop: int, n: int) -> list[int]:
    """n evenly spaced integer steps from ``start`` down to ``stop`` (n + 1 points, unique)."""
    points = np.round(np.linspace(start, stop, n + 1)).astype(int).tolist()
    assert len(set(points)) == n + 1, (start, stop, n)
    return points
