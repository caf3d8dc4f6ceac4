"""The one place a run's method is chosen (``run.method``): what each method decides,
as a :class:`Method`. ``split`` is the package's method (roles/server.py,
roles/host.py; loops.py), ``federated`` the FedAvg baseline a user would run instead
(roles/federated.py; fed_loops.py). Everything around the loops (launchers, wire,
checkpoints, signals, results) is the same for both, and asks no method which it is:
the roles it builds tell (what leaves a client: Client.what_leaves)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from collafuse_hpc.config import Config
from collafuse_hpc.results.schema import SETS
from collafuse_hpc.roles.federated import FedHost, FedServer, client_config
from collafuse_hpc.roles.host import ClientHost
from collafuse_hpc.roles.server import Server
from collafuse_hpc.runtime.fed_loops import fed_client_loop, fed_server_loop
from collafuse_hpc.runtime.loops import client_loop, server_loop
from collafuse_hpc.runtime.topology import Topology
from collafuse_hpc.runtime.wire import Wire

Role = Server | ClientHost | FedServer | FedHost


@dataclass(frozen=True)
class Method:
    """What a method decides: the config its clients run with (their cut and model), the
    server rank's role, the clients' host, the loops that run them (loops.run_role) and
    the image sets evaluate makes of its clients."""

    client_config: Callable[[Config], Config]
    server: Callable[[Config, Topology, int, torch.device, Wire], Server | FedServer]
    host: type[ClientHost]
    server_loop: Callable
    client_loop: Callable
    sets: Callable[[Config], tuple[str, ...]]


def _split_server(cfg: Config, topo: Topology, rank: int, device: torch.device, wire: Wire) -> Server:
    reduce = wire.allreduce_servers if topo.num_servers > 1 else None
    return Server(cfg, topo.clients_of(rank), device, reduce, rank)


def _split_sets(cfg: Config) -> tuple[str, ...]:
    """Every set but ``global``: a split run has no global model."""
    return tuple(s for s in SETS if s != "global")


def _federated_sets(cfg: Config) -> tuple[str, ...]:
    """What each client samples with (collaborative: the fine-tuned model, or the global one
    when F = 0), and the global model's samples beside it when fine-tuned; no client has a
    model of its own to sample alone."""
    return ("collaborative", "global") if cfg.federated.finetune_steps else ("collaborative",)


METHODS = {
    "split": Method(lambda cfg: cfg, _split_server, ClientHost, server_loop, client_loop, _split_sets),
    "federated": Method(
        client_config,
        lambda cfg, topo, rank, device, wire: FedServer(cfg, device),
        FedHost,
        fed_server_loop,
        fed_client_loop,
        _federated_sets,
    ),
}


def method(cfg: Config) -> Method:
    """``cfg.run.method``'s :class:`Method`."""
    return METHODS[cfg.run.method]


def build_role(cfg: Config, topo: Topology, rank: int, device: torch.device, wire: Wire) -> tuple[Role, Callable]:
    """Rank ``rank``'s role under ``cfg.run.method`` and the loop that runs it (loops.run_role)."""
    m = method(cfg)
    if topo.is_server(rank):
        return m.server(cfg, topo, rank, device, wire), m.server_loop
    return m.host(cfg, topo.clients_on(rank), device), m.client_loop
