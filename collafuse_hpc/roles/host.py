"""The clients one rank hosts (``run.clients_per_rank``): built together so that
clients of one model shape share a Trainable, and stepped and sampled in
batches across clients (roles/client.py's batched functions)."""

from __future__ import annotations

import resource
from collections.abc import Callable, Hashable

import torch

from collafuse_hpc.config import Config
from collafuse_hpc.logs import Heartbeat, few
from collafuse_hpc.roles.client import Client, client_nets, finish_samples, local_steps
from collafuse_hpc.runtime.topology import Topology


def batches(clients: list[Client], key: Callable[[Client], Hashable]) -> list[list[Client]]:
    """``clients`` split into groups that run in one batched pass: same Trainable and
    ``key``, in the given order."""
    groups: dict[tuple, list[Client]] = {}
    for c in clients:
        groups.setdefault((id(c.net), key(c)), []).append(c)
    return list(groups.values())


def sampling_key(c: Client) -> Hashable:
    """Clients with the same key sample in one pass: same grid and sampler."""
    return (tuple(c.cut.sampling_grids()[1]), c.cut.eta)


def _allow_open_files(needed: int) -> None:
    """Raise this process's open-file limit to ``needed`` when it is lower (up to the hard
    limit); ValueError saying what to do when even that is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise ValueError(
            f"this rank hosts clients whose shards need about {needed} open files, but the hard limit is {hard} "
            "(ulimit -Hn): lower run.clients_per_rank, or ask for a higher limit"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


class ClientHost:
    """Clients ``indices`` of the config, on ``device``, each a ``client_type``."""

    client_type: type[Client] = Client

    def __init__(self, cfg: Config, indices: list[int], device: torch.device):
        self.device = device
        _allow_open_files(len(indices) + 256)  # every client reads its own shard, kept open
        nets = client_nets(cfg, indices, device)
        self.clients = [self.client_type(cfg, k, device, nets[k]) for k in indices]

    def servers(self, topo: Topology) -> list[int]:
        """The server ranks its clients talk to (told when this rank fails)."""
        return sorted({topo.server_of(c.index) for c in self.clients if c.cut.uses_server})

    def local_steps(self, clients: list[Client]) -> dict[int, float | None]:
        """One local step of each of ``clients`` (this round's participants), batched
        by model and batch size; {client index: loss or None}."""
        out = {}
        for group in batches(clients, lambda c: c.batch_size):
            out.update({c.index: loss for c, loss in zip(group, local_steps(group))})
        return out

    def finish_samples(self, n: int, x_h: dict[int, torch.Tensor | None]) -> dict[int, torch.Tensor]:
        """Every client's samples (after its sample request), batched by model and
        sampling grid; {client index: float32 [n, C, H, W] in [-1, 1]}. A batch's chain
        reports no progress of its own: a heartbeat line says it is still under way."""
        out = {}
        with Heartbeat(f"client(s) {few([c.id for c in self.clients])}") as beat:
            for group in batches(self.clients, sampling_key):
                beat.at(f"sampling {n} images each for {len(group)} client(s)")
                images = finish_samples(group, n, [x_h[c.index] for c in group])
                out.update({c.index: x for c, x in zip(group, images)})
        return out

    def state_dict(self) -> dict:
        """{"clients": {client id: its state}}: a checkpoint file of a client rank."""
        return {"clients": {c.id: c.state_dict() for c in self.clients}}

    def load_state_dict(self, state: dict) -> None:
        for c in self.clients:
            c.load_state_dict(state["clients"][c.id])
