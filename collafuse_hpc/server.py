"""The server: trains the chain above each client's cut on the x_c it receives,
and runs that part of the reverse chain for the clients' sampling requests."""

from __future__ import annotations

from collections import defaultdict

import torch

from .config import Config, cut_step
from .diffusion import GaussianDiffusion, beta_schedule
from .split import Cut
from .topology import role_seed
from .trainable import Trainable
from .unet import UNet
from .wire import Kind, Message, PeerFailure


class Server:
    """Args: clients: indices (into ``cfg.clients``) of the clients it serves."""

    def __init__(self, cfg: Config, rank: int, clients: list[int], device: torch.device):
        self.cfg, self.rank, self.device = cfg, rank, device
        T = cfg.diffusion.timesteps
        self.timesteps = T
        self.cuts = {k: Cut(cut_step(cfg.clients[k], T), T, cfg.diffusion.split) for k in clients}
        self.clients = [k for k in clients if self.cuts[k].uses_server]  # c = 1 never calls
        self.diffusion = GaussianDiffusion(beta_schedule(cfg.diffusion.schedule, T))
        seed = role_seed(cfg.run.seed, "server", rank)
        self.generator = torch.Generator(device).manual_seed(seed)
        # Clients that opt in send labels; the others get the extra "unknown" class.
        self.null_class = cfg.data.num_classes
        shared = any(cfg.clients[k].share_labels for k in clients)
        torch.manual_seed(seed)  # model init
        model = UNet(
            cfg.server.model,
            cfg.data.channels,
            cfg.data.image_size,
            num_classes=self.null_class + 1 if shared else 0,
            cut_conditioning=True,
        )
        self.class_conditioned = shared
        self.net = Trainable(model, cfg.server.optim, device)

    def _eps_model(self, model: torch.nn.Module, t_c: torch.Tensor, y: torch.Tensor | None):
        def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with self.net.autocast():
                return model(x, t, t_c=t_c.expand(len(x)), y=y)

        return eps

    def _labels(self, msgs: list[Message]) -> torch.Tensor | None:
        """Shared labels of ``msgs`` concatenated, the null class where none were sent."""
        if not self.class_conditioned:
            return None
        full = [torch.full((m.count,), self.null_class, device=self.device) for m in msgs]
        return torch.cat([full[i] if m.labels is None else m.labels for i, m in enumerate(msgs)])

    def _check(self, k: int, msg: Message) -> None:
        if msg.t_c != self.cuts[k].t_c:
            raise PeerFailure(
                f"client {self.cfg.clients[k].id!r} sent t_c={msg.t_c}, but the config gives "
                f"t_c={self.cuts[k].t_c}: the ranks run with different configs"
            )

    def _losses(self, x_c: torch.Tensor, t_c: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Per-example server loss on x_c [N, C, H, W] with cut steps t_c [N] (labels y [N])."""
        T, n = self.timesteps, len(x_c)
        u = torch.rand(n, generator=self.generator, device=self.device)
        t = t_c + 1 + (u * (T - t_c)).long().clamp(max=T - 1 - t_c)  # U{t_c+1..T}
        noise = torch.randn(x_c.shape, generator=self.generator, device=self.device)
        anchor = t_c if self.cfg.diffusion.split == "markov" else 0
        return self.diffusion.training_losses(self._eps_model(self.net.model, t_c, y), x_c, t, noise, anchor)

    def train_round(self, msgs: dict[int, Message]) -> dict[int, Message]:
        """One round on ``{client index: TRAIN message}``; returns the replies.

        ``concat`` takes one step on all batches at once; ``sequential`` one step
        per client in a fixed order (the authors' code).
        """
        for k, m in msgs.items():
            self._check(k, m)
        order = sorted(msgs)
        groups = [order] if self.cfg.server.aggregate == "concat" else [[k] for k in order]
        replies = {}
        for group in groups:
            x_c = torch.cat([msgs[k].payload.float() for k in group])
            t_c = torch.cat([torch.full((msgs[k].count,), msgs[k].t_c, device=self.device) for k in group])
            losses = self._losses(x_c, t_c, self._labels([msgs[k] for k in group]))
            self.net.step(losses.mean())
            for k, part in zip(group, losses.detach().split([msgs[k].count for k in group])):
                replies[k] = Message(Kind.TRAIN_REPLY, msgs[k].round, msgs[k].t_c, 1, part.mean().reshape(1).cpu())
        return replies

    def sample(self, requests: dict[int, Message]) -> dict[int, Message]:
        """Serve ``{client index: SAMPLE_REQUEST}``: run T..h with the EMA model.

        Requests with the same cut are batched together (up to ``run.sample_batch``
        images per forward pass); returns x_h [n, C, H, W] per client.
        """
        by_cut: dict[int, list[int]] = defaultdict(list)
        for k in sorted(requests):
            self._check(k, requests[k])
            by_cut[requests[k].t_c].append(k)
        C, S = self.cfg.data.channels, self.cfg.data.image_size
        steps = self.cfg.diffusion.sampling_steps or self.timesteps
        replies = {}
        for t_c, ks in sorted(by_cut.items()):
            cut = self.cuts[ks[0]]
            grid, _ = cut.sampling_grids(steps)
            total = sum(requests[k].count for k in ks)
            y_all = self._labels([requests[k] for k in ks])
            out = []
            for start in range(0, total, self.cfg.run.sample_batch):
                n = min(self.cfg.run.sample_batch, total - start)
                x = torch.randn((n, C, S, S), generator=self.generator, device=self.device)
                y = None if y_all is None else y_all[start : start + n]
                eps = self._eps_model(self.net.ema, torch.tensor([t_c], device=self.device), y)
                out.append(
                    self.diffusion.p_sample_loop(
                        eps, x, grid, a=cut.server_anchor, clip=False, generator=self.generator
                    )
                )
            parts = torch.cat(out).split([requests[k].count for k in ks])
            for k, x_h in zip(ks, parts):
                replies[k] = Message(Kind.SAMPLE_REPLY, requests[k].round, t_c, len(x_h), x_h.contiguous())
        return replies

    def state_dict(self) -> dict:
        return {
            "net": self.net.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
