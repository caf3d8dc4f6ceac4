"""The one place a run's method is chosen (``run.method``): which role each rank
builds and which loop runs it. ``split`` is the package's method (roles/server.py,
roles/host.py; loops.py), ``federated`` the FedAvg baseline a user would run instead
(roles/federated.py; fed_loops.py). Everything around the loops (launchers, wire,
checkpoints, signals, results) is the same for both."""

from __future__ import annotations

from collections.abc import Callable

import torch

from collafuse_hpc.config import Config
from collafuse_hpc.roles.federated import FedHost, FedServer
from collafuse_hpc.roles.host import ClientHost
from collafuse_hpc.roles.server import Server
from collafuse_hpc.runtime.fed_loops import fed_client_loop, fed_server_loop
from collafuse_hpc.runtime.loops import client_loop, server_loop
from collafuse_hpc.runtime.topology import Topology
from collafuse_hpc.runtime.wire import Wire

Role = Server | ClientHost | FedServer | FedHost


def build_role(cfg: Config, topo: Topology, rank: int, device: torch.device, wire: Wire) -> tuple[Role, Callable]:
    """Rank ``rank``'s role under ``cfg.run.method`` and the loop that runs it (loops.run_role)."""
    if cfg.run.method == "federated":
        if topo.is_server(rank):
            return FedServer(cfg, device), fed_server_loop
        return FedHost(cfg, topo.clients_on(rank), device), fed_client_loop
    if topo.is_server(rank):
        reduce = wire.allreduce_servers if topo.num_servers > 1 else None
        return Server(cfg, topo.clients_of(rank), device, reduce, rank), server_loop
    return ClientHost(cfg, topo.clients_on(rank), device), client_loop
