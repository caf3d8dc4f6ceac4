"""A client: trains the chain below its cut on private data and finishes samples.

What leaves a client is only what :meth:`Client.begin_round` and
:meth:`Client.sample_request` return, and each of those is recorded in the
audit first.

Clients of one model shape on one rank are members of one :class:`Trainable`
(unet.py): :func:`local_steps`, :func:`finish_samples` and :func:`sample_alone`
run many of them in one batched pass, each with its own weights, optimizer
state, data and random stream. A client's methods are those functions for one.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from collafuse_hpc.config import Config
from collafuse_hpc.data import EpochSampler, ShardReader, random_hflip, to_model_range
from collafuse_hpc.diffusion.gaussian import GaussianDiffusion, beta_schedule
from collafuse_hpc.diffusion.split import Cut
from collafuse_hpc.diffusion.trainable import Trainable
from collafuse_hpc.diffusion.unet import UNet, members_first, members_side_by_side
from collafuse_hpc.runtime.topology import role_seed
from collafuse_hpc.runtime.wire import WIRE_DTYPES, Kind, Message, one_client


@dataclass
class AuditEntry:
    """One message that left the client."""

    round: int
    kind: int  # wire.Kind value
    images: int  # images in the payload
    t_c: int
    nbytes: int  # this client's message sent alone: header, its parts-table row, payload, labels


def _model_key(cfg: Config, index: int) -> str:
    """Clients with equal keys can be members of one Trainable."""
    c = cfg.clients[index]
    return repr((c.model, c.labels, c.optim, c.compile))


def client_nets(cfg: Config, indices: list[int], device: torch.device) -> dict[int, tuple[Trainable, int]]:
    """{client index: (its Trainable, its member slot)}: one Trainable per model shape.

    Each member starts from the weights client k would have alone (seeded by k),
    so a client's run does not depend on which clients share its rank."""
    groups: dict[str, list[int]] = {}
    for k in indices:
        groups.setdefault(_model_key(cfg, k), []).append(k)
    nets = {}
    for ks in groups.values():
        c = cfg.clients[ks[0]]
        shape = (c.model, cfg.data.channels, cfg.data.image_size, cfg.data.num_classes if c.labels else 0)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # the caller's global stream stays as it was
            # built on the CPU and written over: meta tensors and to_empty would import sympy (0.45 s of CPU a rank)
            model = UNet(*shape, members=len(ks))
            for slot, k in enumerate(ks):
                torch.manual_seed(role_seed(cfg.run.seed, "client", k))
                for w, w1 in zip(model.parameters(), UNet(*shape).parameters()):
                    w[slot].copy_(w1[0])
        net = Trainable(model, c.optim, device, c.compile)
        nets.update({k: (net, slot) for slot, k in enumerate(ks)})
    return nets


class Client:
    """One client. ``net``: its Trainable and member slot (client_nets); None builds
    one of its own."""

    def __init__(self, cfg: Config, index: int, device: torch.device, net: tuple[Trainable, int] | None = None):
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
        self.net, self.slot = net or client_nets(cfg, [index], device)[index]
        self.dropout_stream = torch.Generator(device).manual_seed(role_seed(cfg.run.seed, "dropout", index))
        self.net.dropout_streams[self.slot] = self.dropout_stream
        self.audit: list[AuditEntry] = []
        # what left this client over the whole run (checkpointed, so a resumed run counts on)
        self.released = {"images_sent": 0, "messages_sent": 0, "bytes_sent": 0}
        self._x0: torch.Tensor | None = None
        self._y: torch.Tensor | None = None  # labels of this round's batch, int64 [B]
        self.sample_labels: torch.Tensor | None = None  # labels of the requested samples, int64 [n], or None
        self.global_model: torch.Tensor | None = None  # federated: the global model it received, float32 [P]

    def eps_model(self, ema: bool, y: torch.Tensor | None):
        """eps(x, t) of the training (``ema`` False) or sampling copy, labels y [N] or None."""
        return _eps([self], ema, y)

    def _randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, device=self.device)

    def record(self, msg: Message) -> Message:
        """Count ``msg`` as sent by this client (the audit), and return it: call on everything
        that leaves the client, as it leaves."""
        images = msg.count if msg.kind == Kind.TRAIN else 0
        self.audit.append(AuditEntry(msg.round, int(msg.kind), images, msg.t_c, msg.nbytes))
        self.released["images_sent"] += images
        self.released["messages_sent"] += 1
        self.released["bytes_sent"] += msg.nbytes
        return msg

    def what_leaves(self) -> str:
        """In words, what this client sends (the audit's ``sent``)."""
        local = "its labels condition its model and stay local" if self.condition else ""
        if not self.cut.uses_server:
            return "nothing (c = 1)" + (f"; {local}" if local else "")
        labels = "its labels, with each x_c and sampling request" if self.share_labels else local
        return f"x_c at t_c = {self.cut.t_c} and sampling requests" + (f"; {labels}" if labels else "")

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
        return self.record(one_client(Kind.TRAIN, round_, self.index, self.cut.t_c, len(x_c), x_c, shared))

    def local_step(self, t_max: int | None = None) -> float | None:
        """One optimizer step on this round's batch at t ~ U{1..t_max} (default t_c, the
        client's part; T measures the whole chain); None when that range is empty."""
        return local_steps([self], t_max)[0]

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
        return self.record(one_client(Kind.SAMPLE_REQUEST, round_, self.index, self.cut.t_c, n, None, shared))

    def finish_samples(self, n: int, x_h: torch.Tensor | None) -> torch.Tensor:
        """:func:`finish_samples` of this client alone."""
        return finish_samples([self], n, [x_h])[0]

    def sample_alone(self, n: int) -> torch.Tensor:
        """:func:`sample_alone` of this client alone."""
        return sample_alone([self], n)[0]

    def _image_shape(self, n: int) -> tuple[int, int, int, int]:
        return n, self.cfg.data.channels, self.cfg.data.image_size, self.cfg.data.image_size

    @contextlib.contextmanager
    def scratch(self) -> Iterator[None]:
        """Work inside the block leaves no trace: weights, optimizer, data order, random
        streams and the audit are restored after (measurements of client compute)."""
        state = copy.deepcopy(self.state_dict())
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
        """The client's own state, whichever rank hosts it (a checkpoint may be
        resumed with another placement)."""
        return {
            "net": self.net.member_state(self.slot),
            "sampler": self.sampler.state_dict(),
            "generator": self.generator.get_state(),
            "dropout": self.dropout_stream.get_state(),
            "released": dict(self.released),
        }

    def load_state_dict(self, state: dict) -> None:
        self.load_weights(state)
        self.sampler.load_state_dict(state["sampler"])
        self.generator.set_state(state["generator"])
        if "dropout" in state:  # sets written before dropout had its own stream start it from the seed
            self.dropout_stream.set_state(state["dropout"])

    def count_audited(self, audited: dict[str, int]) -> None:
        """Count what the audit rows hold as sent (results/schema.audit_totals): messages
        sent after the checkpoint set (rounds trained again after a crash, each
        ``sample``'s request) left the client too. Both counts miss nothing they saw, so
        each total is the larger of the two (rows lost in a crash stay counted by the set)."""
        self.released = {k: max(v, audited[k]) for k, v in self.released.items()}

    def load_weights(self, state: dict) -> None:
        """Weights, optimizer state and audit totals of a :meth:`state_dict` (not the
        data order and random stream: an evaluation draws its own)."""
        self.net.load_member_state(self.slot, state["net"])
        self.released = dict(state["released"])


def _eps(clients: list[Client], ema: bool, y: torch.Tensor | None) -> Callable:
    """eps(x, t) of ``clients`` (members of one Trainable) together: x [K*n, C, H, W]
    holds client j's n images at j*n.., t and y (or None) are [K*n]."""
    net, slots, K = clients[0].net, [c.slot for c in clients], len(clients)
    assert all(c.net is net for c in clients)

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond = {} if y is None else {"y": y.view(K, -1).T}  # (n, K)
        out = net.forward(members_side_by_side(x, K), t.view(K, -1).T, ema, members=slots, **cond)
        return members_first(out, K)

    return eps


def local_steps(clients: list[Client], t_max: int | None = None) -> list[float | None]:
    """One optimizer step for each of ``clients`` (members of one Trainable, one batch
    size) on its round's batch at t ~ U{1..t_max} (default its t_c; T measures the
    whole chain), in one batched pass. Returns each client's loss, None where that
    range is empty (it does not step)."""
    ranges = [(c.cut.client_train_steps[0], c.cut.client_train_steps[1] if t_max is None else t_max) for c in clients]
    active = [i for i, (low, high) in enumerate(ranges) if high >= low]
    out: list[float | None] = [None] * len(clients)
    if not active:
        return out
    cs = [clients[i] for i in active]
    # each client's draws in the order it made them alone: its t, then its noise
    t = torch.cat(
        [
            torch.randint(low, high + 1, (len(c._x0),), generator=c.generator, device=c.device)
            for c, (low, high) in zip(cs, [ranges[i] for i in active])
        ]
    )
    noise = torch.cat([c._randn(c._x0.shape) for c in cs])
    x0 = torch.cat([c._x0 for c in cs])  # (K*B, C, H, W)
    y = torch.cat([c._y for c in cs]) if cs[0].condition else None
    losses = cs[0].diffusion.training_losses(_eps(cs, False, y), x0, t, noise).view(len(cs), -1).mean(1)
    cs[0].net.step(losses.sum(), members=[c.slot for c in cs])
    for i, loss in zip(active, losses.tolist()):
        out[i] = loss
    return out


def _sampling_labels(clients: list[Client]) -> torch.Tensor | None:
    return torch.cat([c.sample_labels for c in clients]) if clients[0].condition else None


def finish_samples(clients: list[Client], n: int, x_h: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """Run the clients' part of the reverse chain with their EMA models, together
    (after each one's :meth:`Client.sample_request`; members of one Trainable with
    one sampling grid).

    Args:
        x_h: per client, the server's output at the hand-over step [n, C, H, W], or
             None when c = 1 (start from pure noise at T).
    Returns:
        per client, samples in [-1, 1], float32 [n, C, H, W].
    """
    c0 = clients[0]
    _, grid = c0.cut.sampling_grids()
    x = torch.cat([c._randn(c._image_shape(n)) if x is None else x.float() for c, x in zip(clients, x_h)])
    if not grid:  # c = 0: the server produced x_0 itself
        return list(x.clamp(-1, 1).split(n))
    eps = _eps(clients, True, _sampling_labels(clients))
    gens = [c.generator for c in clients]
    out = c0.diffusion.p_sample_loop(eps, x, grid, a=0, clip=True, generator=gens, eta=c0.cut.eta)
    return list(out.split(n))


def sample_alone(clients: list[Client], n: int) -> list[torch.Tensor]:
    """n samples of each client's model on the whole chain T..0 from pure noise (with
    the labels of its last request), together: what each could make without the
    server. Returns per client float32 [n, C, H, W] in [-1, 1]."""
    c0 = clients[0]
    _, grid = c0.cut.full_chain().sampling_grids()
    x_T = torch.cat([c._randn(c._image_shape(n)) for c in clients])
    eps = _eps(clients, True, _sampling_labels(clients))
    gens = [c.generator for c in clients]
    return list(c0.diffusion.p_sample_loop(eps, x_T, grid, a=0, clip=True, generator=gens, eta=c0.cut.eta).split(n))
