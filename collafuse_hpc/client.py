"""A client: trains the chain below its cut on private data and finishes samples.

What leaves a client is only what :meth:`Client.begin_round` and
:meth:`Client.sample_request` return, and each of those is recorded in the
audit first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import Config, cut_step
from .data import EpochSampler, ShardReader, random_hflip, to_model_range
from .diffusion import GaussianDiffusion, beta_schedule
from .split import Cut
from .topology import role_seed
from .trainable import Trainable
from .unet import UNet
from .wire import WIRE_DTYPES, Kind, Message


@dataclass
class AuditEntry:
    """One message that left the client."""

    round: int
    kind: int  # wire.Kind value
    images: int  # images in the payload
    t_c: int
    nbytes: int  # header + payload


class Client:
    def __init__(self, cfg: Config, index: int, device: torch.device):
        c = cfg.clients[index]
        self.cfg, self.index, self.id, self.device = cfg, index, c.id, device
        T = cfg.diffusion.timesteps
        self.cut = Cut(cut_step(c, T), T, cfg.diffusion.split)
        self.diffusion = GaussianDiffusion(beta_schedule(cfg.diffusion.schedule, T))
        self.reader = ShardReader(c.shard, "train")
        self.batch_size, self.hflip = c.batch_size, c.hflip
        self.wire_dtype = WIRE_DTYPES[c.wire_dtype]
        seed = role_seed(cfg.run.seed, "client", index)
        self.sampler = EpochSampler(len(self.reader), c.batch_size, seed)
        self.generator = torch.Generator(device).manual_seed(seed)
        self.condition, self.share_labels = c.labels, c.share_labels
        self.train_labels = self.reader.labels() if c.labels or c.share_labels else None
        torch.manual_seed(seed)  # model init
        model = UNet(
            c.model,
            cfg.data.channels,
            cfg.data.image_size,
            num_classes=cfg.data.num_classes if c.labels else 0,
        )
        self.net = Trainable(model, c.optim, device, c.compile)
        self.audit: list[AuditEntry] = []
        self._x0: torch.Tensor | None = None
        self._y: torch.Tensor | None = None  # labels of this round's batch, int64 [B]
        self._sample_y: torch.Tensor | None = None  # labels of the requested samples, int64 [n]

    def eps_model(self, ema: bool, y: torch.Tensor | None):
        """eps(x, t) of the training (``ema`` False) or sampling copy, labels y [N] or None."""

        def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.net.forward(x, t, ema, y=y)

        return eps

    def _randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, device=self.device)

    def _record(self, msg: Message) -> Message:
        images = msg.count if msg.kind == Kind.TRAIN else 0
        self.audit.append(AuditEntry(msg.round, int(msg.kind), images, msg.t_c, msg.nbytes))
        return msg

    def begin_round(self, round_: int) -> Message | None:
        """Draw this round's batch; return x_c for the server (None when c = 1).

        x_c = sqrt(abar_{t_c}) x_0 + sqrt(1 - abar_{t_c}) eps_c with fresh eps_c, in the
        configured wire dtype: the only thing derived from x_0 that leaves the client.
        """
        images, labels = self.reader.read(self.sampler.next())
        self._x0 = to_model_range(images, self.device)  # (B, C, H, W) in [-1, 1]
        if self.hflip:
            self._x0 = random_hflip(self._x0, self.generator)
        self._y = torch.from_numpy(labels).to(self.device) if self.train_labels is not None else None
        if not self.cut.uses_server:
            return None
        t_c = torch.full((len(self._x0),), self.cut.t_c, device=self.device)
        x_c = self.diffusion.q_sample(self._x0, t_c, self._randn(self._x0.shape)).to(self.wire_dtype)
        shared = self._y if self.share_labels else None
        return self._record(Message(Kind.TRAIN, round_, self.cut.t_c, len(x_c), x_c, shared))

    def local_step(self) -> float | None:
        """One optimizer step on t ~ U{1..t_c}; None when t_c = 0 (nothing local)."""
        if self.cut.t_c == 0:
            return None
        x0, n = self._x0, len(self._x0)
        t = torch.randint(1, self.cut.t_c + 1, (n,), generator=self.generator, device=self.device)
        noise = self._randn(x0.shape)
        y = self._y if self.condition else None
        loss = self.diffusion.training_losses(self.eps_model(False, y), x0, t, noise).mean()
        self.net.step(loss)
        return loss.item()

    def sample_request(self, round_: int, n: int) -> Message | None:
        """Draw the labels of n samples (from the client's own label frequencies, when
        it uses labels) and ask the server for them (None when c = 1)."""
        self._sample_y = None
        if self.train_labels is not None:
            pick = torch.randint(len(self.train_labels), (n,), generator=self.generator, device=self.device)
            self._sample_y = torch.from_numpy(self.train_labels).to(self.device)[pick]
        if not self.cut.uses_server:
            return None
        shared = self._sample_y if self.share_labels else None
        return self._record(Message(Kind.SAMPLE_REQUEST, round_, self.cut.t_c, n, None, shared))

    def finish_samples(self, n: int, x_h: torch.Tensor | None) -> torch.Tensor:
        """Run the client's part of the reverse chain with the EMA model (after
        :meth:`sample_request`).

        Args:
            x_h: the server's output at the hand-over step [n, C, H, W], or None
                 when c = 1 (start from pure noise at T).
        Returns:
            samples in [-1, 1], float32 [n, C, H, W].
        """
        steps = self.cfg.diffusion.sampling_steps or self.cut.timesteps
        _, grid = self.cut.sampling_grids(steps)
        if x_h is None:
            shape = (n, self.cfg.data.channels, self.cfg.data.image_size, self.cfg.data.image_size)
            x_h = self._randn(shape)
        if not grid:  # c = 0: the server produced x_0 itself
            return x_h.float().clamp(-1, 1)
        eps = self.eps_model(True, self._sample_y if self.condition else None)
        return self.diffusion.p_sample_loop(eps, x_h.float(), grid, a=0, clip=True, generator=self.generator)

    def drain_audit(self) -> list[AuditEntry]:
        """Entries recorded since the last call (the loop stores them in results)."""
        entries, self.audit = self.audit, []
        return entries

    def state_dict(self) -> dict:
        return {
            "net": self.net.state_dict(),
            "sampler": self.sampler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.sampler.load_state_dict(state["sampler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
