"""The server: trains the chain above each client's cut on the x_c it receives,
and runs that part of the reverse chain for the clients' sampling requests."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch

from collafuse_hpc.config import Config
from collafuse_hpc.diffusion.gaussian import GaussianDiffusion, beta_schedule
from collafuse_hpc.diffusion.split import Cut, cuts
from collafuse_hpc.diffusion.trainable import Trainable
from collafuse_hpc.diffusion.unet import UNet
from collafuse_hpc.logs import Progress
from collafuse_hpc.runtime.topology import role_seed
from collafuse_hpc.runtime.wire import WIRE_DTYPES, Kind, Message, PeerFailure, one_client

NOISE_BLOCK = 64  # images of a sampling request that share one noise stream


def _blocks(count: int) -> list[int]:
    """A request of ``count`` images as blocks of at most NOISE_BLOCK images."""
    return [min(NOISE_BLOCK, count - start) for start in range(0, count, NOISE_BLOCK)]


def _batches(blocks: list[tuple[int, torch.Generator]], size: int) -> list[list[tuple[int, torch.Generator]]]:
    """Consecutive whole blocks (rows, stream) of up to ``size`` rows (one block at least)."""
    out: list[list[tuple[int, torch.Generator]]] = [[]]
    for block in blocks:
        if out[-1] and sum(rows for rows, _ in out[-1]) + block[0] > size:
            out.append([])
        out[-1].append(block)
    return [b for b in out if b]


class Server:
    """One server replica.

    With ``server.count > 1`` every replica starts from the same weights, sums its
    gradients with the others' (``reduce``) and so stays identical. Random draws
    for a client's data come from a stream of that client's own (seeded by the
    client index), so results do not depend on which replica serves whom.

    Args:
        clients: indices (into ``cfg.clients``) of the clients this replica serves.
        reduce: sums a flat gradient tensor in place over the replicas (None for one).
        rank: this replica's rank (dropout draws from each client's stream, not the replica's).
    """

    def __init__(
        self,
        cfg: Config,
        clients: list[int],
        device: torch.device,
        reduce: Callable[[torch.Tensor], None] | None = None,
        rank: int = 0,
    ):
        self.cfg, self.device = cfg, device
        every = cuts(cfg)
        self.cuts: dict[int, Cut] = {k: every[k] for k in clients}
        self.clients = [k for k in clients if self.cuts[k].uses_server]  # c = 1 never calls
        self.diffusion = GaussianDiffusion(beta_schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps))
        self.streams = {
            k: torch.Generator(device).manual_seed(role_seed(cfg.run.seed, "stream", k)) for k in self.clients
        }
        self.reduce = reduce
        # batch of every client that calls a server (on any replica): the loss is a mean over all
        # the images of a round, summed across replicas
        self.batch_sizes = {k: c.batch_size for k, (c, cut) in enumerate(zip(cfg.clients, every)) if cut.uses_server}
        # Clients that opt in send labels; the others get the extra "unknown" class.
        self.null_class = cfg.data.num_classes
        shared = any(c.share_labels for c in cfg.clients)
        with torch.random.fork_rng(devices=[]):  # the same init on every replica; the caller's stream is kept
            torch.manual_seed(role_seed(cfg.run.seed, "server", 0))
            model = UNet(
                cfg.server.model,
                cfg.data.channels,
                cfg.data.image_size,
                num_classes=self.null_class + 1 if shared else 0,
                cut_conditioning=True,
            )
        self.class_conditioned = shared
        self.net = Trainable(model, cfg.server.optim, device, cfg.server.compile)
        # dropout's masks for a client's images: a stream of that client's own, as its data's
        self.dropout_streams = {
            k: torch.Generator(device).manual_seed(role_seed(cfg.run.seed, "server_dropout", k)) for k in self.clients
        }

    def eps_model(self, ema: bool, t_c: torch.Tensor, y: torch.Tensor | None):
        """eps(x, t) of the training (``ema`` False) or sampling copy at cut t_c [1], labels y [N] or None."""

        def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.net.forward(x, t, ema, t_c=t_c.expand(len(x)), y=y)

        return eps

    def labels(self, msgs: list[Message]) -> torch.Tensor | None:
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

    def _losses(self, msgs: list[tuple[int, Message]]) -> torch.Tensor:
        """Per-example server loss [N] on the concatenated x_c of ``[(client, msg)]``."""

        def per_image(value) -> torch.Tensor:
            return torch.cat([torch.full((m.count,), value(k), device=self.device) for k, m in msgs])

        x_c = torch.cat([m.payload.float() for _, m in msgs])  # (N, C, H, W)
        t_c, T = per_image(lambda k: self.cuts[k].t_c), self.diffusion.num_timesteps
        u = torch.cat([torch.rand(m.count, generator=self.streams[k], device=self.device) for k, m in msgs])
        noise = torch.cat(
            [torch.randn(m.payload.shape, generator=self.streams[k], device=self.device) for k, m in msgs]
        )
        t = t_c + 1 + (u * (T - t_c)).long().clamp(max=T - 1 - t_c)  # U{t_c+1..T}, the server's part
        anchor = per_image(lambda k: self.cuts[k].server_anchor)
        y = self.labels([m for _, m in msgs])
        self.net.dropout_streams[0] = [(m.count, self.dropout_streams[k]) for k, m in msgs]
        return self.diffusion.training_losses(self.eps_model(False, t_c, y), x_c, t, noise, anchor)

    def train_round(
        self,
        msgs: dict[int, Message],
        reply: Callable[[int, Message], None],
        taking_part: frozenset[int] | None = None,
    ) -> None:
        """One round on ``{client index: TRAIN message}``; ``taking_part``: the clients of
        this round on every replica (None: all), whose images the loss is averaged over.

        ``reply(client, TRAIN_REPLY)`` is called as soon as the forward pass has
        the losses, before backward and the optimizer step, so a client can start
        its next round while this replica is still computing.
        ``concat`` takes one step on all batches at once (summed with the other
        replicas' batches); ``sequential`` one step per client in a fixed order
        (the authors' code; one replica only).
        """
        for k, m in msgs.items():
            self._check(k, m)
        order = sorted(msgs)
        groups = [order] if self.cfg.server.aggregate == "concat" else [[k] for k in order]
        for group in groups:
            losses = self._losses([(k, msgs[k]) for k in group]) if group else None
            if losses is not None:
                parts = losses.detach().cpu().split([msgs[k].count for k in group])
                for k, part in zip(group, parts):
                    reply(k, one_client(Kind.TRAIN_REPLY, msgs[k].round, k, msgs[k].t_c, 1, part.mean().reshape(1)))
            if self.reduce is None:
                self.net.step(None if losses is None else losses.mean())
            else:  # sum / N over all replicas' images, then summed across replicas: the global mean
                images = sum(b for k, b in self.batch_sizes.items() if taking_part is None or k in taking_part)
                self.net.step(None if losses is None else losses.sum() / images, reduce=self.reduce)

    def sample(self, requests: dict[int, Message], check: Callable[[], None] = lambda: None) -> dict[int, Message]:
        """Serve ``{client index: SAMPLE_REQUEST}``: run T..h with the EMA model.

        Requests with the same cut are batched together (at most ``run.sample_batch``
        images per forward pass); returns x_h [n, C, H, W] per client. Every block of
        :data:`NOISE_BLOCK` images of a request draws its noise from a stream seeded by
        that client's own stream, and batches hold whole blocks, so a client's samples
        do not depend on the batch size or on which clients share a batch. ``check``
        runs before every step (it raises when a client died meanwhile).
        """
        by_cut: dict[int, list[int]] = defaultdict(list)
        for k in sorted(requests):
            self._check(k, requests[k])
            by_cut[requests[k].t_c].append(k)
        C, S = self.cfg.data.channels, self.cfg.data.image_size
        replies = {}
        progress = Progress(f"server sampling for {len(requests)} client(s)", sum(m.count for m in requests.values()))
        for t_c, ks in sorted(by_cut.items()):
            cut = self.cuts[ks[0]]
            grid, _ = cut.sampling_grids()
            y_all = self.labels([requests[k] for k in ks])
            blocks = [(n, self._block_stream(k)) for k in ks for n in _blocks(requests[k].count)]
            out, start = [], 0
            for batch in _batches(blocks, self.cfg.run.sample_batch):
                n = sum(rows for rows, _ in batch)
                x = torch.cat([torch.randn((rows, C, S, S), generator=g, device=self.device) for rows, g in batch])
                y = None if y_all is None else y_all[start : start + n]
                eps = _checked(self._sampling_eps(t_c, y), check)
                out.append(
                    self.diffusion.p_sample_loop(
                        eps, x, grid, a=cut.server_anchor, clip=cut.server_clips, generator=batch, eta=cut.eta
                    )
                )
                start += n
                progress.update(n)
            parts = torch.cat(out).split([requests[k].count for k in ks])
            for k, x_h in zip(ks, parts):
                x_h = x_h.to(WIRE_DTYPES[self.cfg.clients[k].wire_dtype]).contiguous()
                replies[k] = one_client(Kind.SAMPLE_REPLY, requests[k].round, k, t_c, len(x_h), x_h)
        return replies

    def _sampling_eps(self, t_c: int, y: torch.Tensor | None) -> Callable:
        """eps(x, t) of the sampling copy, run ``run.sample_batch`` images at a time: a
        batch of whole noise blocks may hold more images than one forward pass may."""
        size, cut = self.cfg.run.sample_batch, torch.tensor([t_c], device=self.device)

        def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            parts = []
            for i in range(0, len(x), size):
                labels = None if y is None else y[i : i + size]
                parts.append(self.eps_model(True, cut, labels)(x[i : i + size], t[i : i + size]))
            return torch.cat(parts)

        return eps

    def _block_stream(self, client: int) -> torch.Generator:
        """A new stream for one block of ``client``'s request, seeded from its stream."""
        seed = int(torch.randint(2**62, (1,), generator=self.streams[client], device=self.device))
        return torch.Generator(self.device).manual_seed(seed)

    def continue_alone(
        self, client: int, request: Message, x_h: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """What a curious server could make of its part alone: its own model continuing
        client ``client``'s grid from x_h [n, C, H, W] (its reply to ``request``) down to
        t = 0, as if x_h were a clean chain (anchor 0, clipped). Returns float32 [n, C, H, W]."""
        cut = self.cuts[client]
        _, grid = cut.sampling_grids()
        if not grid:  # c = 0: x_h is already x_0
            return x_h.float().clamp(-1, 1)
        eps = self.eps_model(True, torch.tensor([cut.t_c], device=self.device), self.labels([request]))
        return self.diffusion.p_sample_loop(eps, x_h.float(), grid, a=0, clip=True, generator=generator, eta=cut.eta)

    def state_dict(self) -> dict:
        return {
            "net": self.net.member_state(0),
            "streams": {str(k): g.get_state() for k, g in self.streams.items()},
            "dropout_clients": {str(k): g.get_state() for k, g in self.dropout_streams.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.net.load_member_state(0, state["net"])
        for k, g in self.streams.items():
            g.set_state(state["streams"][str(k)])
        # sets of one dropout stream per replica (before dropout drew per client), or none, load: their
        # clients' dropout streams start from the seed
        for k, g in self.dropout_streams.items():
            if str(k) in state.get("dropout_clients", {}):
                g.set_state(state["dropout_clients"][str(k)])


def _checked(eps: Callable, check: Callable[[], None]) -> Callable:
    """``eps`` that calls ``check`` first (once per reverse step)."""

    def wrapped(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        check()
        return eps(x, t)

    return wrapped
