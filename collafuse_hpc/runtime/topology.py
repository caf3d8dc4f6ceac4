"""Which rank is what. The only place that maps ranks to roles.

Ranks 0..S-1 are servers; ranks S.. are client ranks, each hosting
``run.clients_per_rank`` clients (P) in config order: client rank S+j hosts
clients jP..jP+P-1 (the last one fewer when P does not divide the number of
clients). Client k is served by server k mod S, whichever rank hosts it, so a
client's results do not depend on the placement, and the placement may change
when a run resumes. Built from the config and the world size and validated
before any collective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from collafuse_hpc.config import Config


@dataclass(frozen=True)
class Topology:
    num_servers: int
    client_ids: tuple[str, ...]
    clients_per_rank: int = 1

    @classmethod
    def from_config(cls, cfg: Config, world_size: int | None = None) -> Topology:
        topo = cls(cfg.server.count, tuple(c.id for c in cfg.clients), cfg.run.clients_per_rank)
        if world_size is not None and world_size != topo.world_size:
            hosting = f", {topo.clients_per_rank} per rank" if topo.clients_per_rank > 1 else ""
            raise ValueError(
                f"world size {world_size} does not match the config: {topo.num_servers} server "
                f"rank(s) + {topo.client_ranks} client rank(s) ({len(topo.client_ids)} clients{hosting}) = "
                f"{topo.world_size}; launch with {topo.world_size} ranks (e.g. mpirun -np {topo.world_size}), "
                "pass --in-process, or edit 'clients' or 'run.clients_per_rank'"
            )
        return topo

    @property
    def client_ranks(self) -> int:
        return math.ceil(len(self.client_ids) / self.clients_per_rank)

    @property
    def world_size(self) -> int:
        return self.num_servers + self.client_ranks

    def is_server(self, rank: int) -> bool:
        return rank < self.num_servers

    def clients_on(self, rank: int) -> list[int]:
        """Indices (into ``cfg.clients``) of the clients a client rank hosts."""
        assert not self.is_server(rank), rank
        first = (rank - self.num_servers) * self.clients_per_rank
        return list(range(first, min(first + self.clients_per_rank, len(self.client_ids))))

    def rank_of(self, index: int) -> int:
        """The client rank that hosts client ``index``."""
        return self.num_servers + index // self.clients_per_rank

    def server_of(self, client_index: int) -> int:
        """Rank of the server that serves client ``client_index``."""
        return client_index % self.num_servers

    def clients_of(self, server_rank: int) -> list[int]:
        """Client indices served by ``server_rank``, in the fixed order messages flow."""
        return [k for k in range(len(self.client_ids)) if self.server_of(k) == server_rank]

    def describe(self, rank: int) -> str:
        """Human name of a rank, e.g. ``rank 2 (client 'c1')``, ``rank 1 (clients 'c0'..'c31')``."""
        if self.is_server(rank):
            return f"rank {rank} (server {rank})"
        ids = [self.client_ids[k] for k in self.clients_on(rank)]
        if len(ids) == 1:
            return f"rank {rank} (client {ids[0]!r})"
        return f"rank {rank} (clients {ids[0]!r}..{ids[-1]!r})"


def participants(cfg: Config, round_: int) -> frozenset[int]:
    """Indices of the clients that take part in round ``round_``: all of them, or
    ``run.clients_per_round`` drawn without replacement, as federated frameworks sample
    clients per round. Seeded by the run's seed and the round: the same on every rank,
    whatever the placement and however often the run was resumed."""
    n, k = len(cfg.clients), cfg.run.clients_per_round
    if not k or k >= n:
        return frozenset(range(n))
    rng = np.random.default_rng([cfg.run.seed, round_, 0x70A7])  # a stream of its own
    return frozenset(rng.choice(n, size=k, replace=False).tolist())


def role_seed(base: int, rank_kind: str, index: int) -> int:
    """Seed of one role's private random stream, independent of the process layout
    (the same role draws the same numbers in a distributed and an in-process run)."""
    kinds = {"server": 1, "client": 2, "stream": 3, "dropout": 4, "server_dropout": 5, "finetune": 6}
    return int(np.random.SeedSequence([base, kinds[rank_kind], index]).generate_state(1)[0])
