"""A client: trains the chain below its cut on private data and finishes samples.

What leaves a client is only what :meth:`Client.begin_round` and
:meth:`Client.sample_request` return, and each of those is recorded in the
audit first.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from collafuse_hpc.config import Config
from collafuse_hpc.data import EpochSampler, ShardReader, random_hflip, to_model_range
from collafuse_hpc.diffusion.gaussian import GaussianDiffusion, beta_schedule
from collafuse_hpc.diffusion.split import Cut
from collafuse_hpc.diffusion.trainable import Trainable
from collafuse_hpc.diffusion.unet import UNet
from collafuse_hpc.runtime.topology import role_seed
from collafuse_hpc.runtime.wire import WIRE_DTYPES, Kind, Message


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
        self.cut = Cut.for_client(cfg, index)
        self.diffusion = GaussianDiffusion(beta_schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps))
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
        # what left this client over the whole run (checkpointed, so a resumed run counts on)
        self.released = {"images_sent": 0, "messages_sent": 0, "bytes_sent": 0}
        self._x0: torch.Tensor | None = None
        self._y: torch.Tensor | None = None  # labels of this round's batch, int64 [B]
        self.sample_labels: torch.Tensor | None = None  # labels of the requested samples, int64 [n], or None

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
        self.released["images_sent"] += images
        self.released["messages_sent"] += 1
        self.released["bytes_sent"] += msg.nbytes
        return msg

    def noised_to_cut(self, x0: torch.Tensor) -> torch.Tensor:
        """x_c = sqrt(abar_{t_c}) x_0 + sqrt(1 - abar_{t_c}) eps_c with fresh eps_c, in the
        wire dtype: exactly what the server receives for images x0 [B, C, H, W]."""
        t_c = torch.full((len(x0),), self.cut.t_c, device=self.device)
        return self.diffusion.q_sample(x0, t_c, self._randn(x0.shape)).to(self.wire_dtype)

    def begin_round(self, round_: int) -> Message | None:
        """Draw this round's batch; return x_c for the server (None when c = 1): the
        only thing derived from x_0 that leaves the client (:meth:`noised_to_cut`)."""
        images, labels = self.reader.read(self.sampler.next())
        self._x0 = to_model_range(images, self.device)  # (B, C, H, W) in [-1, 1]
        if self.hflip:
            self._x0 = random_hflip(self._x0, self.generator)
        self._y = torch.from_numpy(labels).to(self.device) if self.train_labels is not None else None
        if not self.cut.uses_server:
            return None
        x_c = self.noised_to_cut(self._x0)
        shared = self._y if self.share_labels else None
        return self._record(Message(Kind.TRAIN, round_, self.cut.t_c, len(x_c), x_c, shared))

    def local_step(self, t_max: int | None = None) -> float | None:
        """One optimizer step on this round's batch at t ~ U{1..t_max} (default t_c, the
        client's part; T measures the whole chain); None when that range is empty."""
        low, high = self.cut.client_train_steps
        high = high if t_max is None else t_max
        if high < low:
            return None
        x0, n = self._x0, len(self._x0)
        t = torch.randint(low, high + 1, (n,), generator=self.generator, device=self.device)
        noise = self._randn(x0.shape)
        y = self._y if self.condition else None
        loss = self.diffusion.training_losses(self.eps_model(False, y), x0, t, noise).mean()
        self.net.step(loss)
        return loss.item()

    def sample_request(self, round_: int, n: int) -> Message | None:
        """Draw the labels of n samples (from the client's own label frequencies, when
        it uses labels) and ask the server for them (None when c = 1)."""
        self.sample_labels = None
        if self.train_labels is not None:
            pick = torch.randint(len(self.train_labels), (n,), generator=self.generator, device=self.device)
            self.sample_labels = torch.from_numpy(self.train_labels).to(self.device)[pick]
        if not self.cut.uses_server:
            return None
        shared = self.sample_labels if self.share_labels else None
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
        _, grid = self.cut.sampling_grids()
        if x_h is None:
            x_h = self._randn(self._image_shape(n))
        if not grid:  # c = 0: the server produced x_0 itself
            return x_h.float().clamp(-1, 1)
        eps = self.eps_model(True, self.sample_labels if self.condition else None)
        return self.diffusion.p_sample_loop(
            eps, x_h.float(), grid, a=0, clip=True, generator=self.generator, eta=self.cut.eta
        )

    def sample_alone(self, n: int) -> torch.Tensor:
        """n samples of the client's model on the whole chain T..0 from pure noise (with
        the labels of the last request): what the client could make without the server.
        Returns float32 [n, C, H, W] in [-1, 1]."""
        _, grid = self.cut.full_chain().sampling_grids()
        eps = self.eps_model(True, self.sample_labels if self.condition else None)
        x_T = self._randn(self._image_shape(n))
        return self.diffusion.p_sample_loop(eps, x_T, grid, a=0, clip=True, generator=self.generator, eta=self.cut.eta)

    def _image_shape(self, n: int) -> tuple[int, int, int, int]:
        return n, self.cfg.data.channels, self.cfg.data.image_size, self.cfg.data.image_size

    @contextlib.contextmanager
    def scratch(self) -> Iterator[None]:
        """Work inside the block leaves no trace: weights, optimizer, data order, random
        streams and the audit are restored after (measurements of client compute)."""
        state = copy.deepcopy(self.state_dict())  # state_dict() holds the live tensors
        audit = list(self.audit)
        try:
            yield
        finally:
            self.load_state_dict(state)
            self.audit = audit

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
            "released": dict(self.released),
        }

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.released = dict(state["released"])
        self.sampler.load_state_dict(state["sampler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
