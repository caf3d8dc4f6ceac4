"""Which rank is what. The only place that maps ranks to roles.

Ranks 0..S-1 are servers, ranks S..S+K-1 the clients in config order. Client k
is served by server k mod S. Built from the config and the world size and
validated before any collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from collafuse_hpc.config import Config


@dataclass(frozen=True)
class Topology:
    num_servers: int
    client_ids: tuple[str, ...]

    @classmethod
    def from_config(cls, cfg: Config, world_size: int | None = None) -> Topology:
        topo = cls(cfg.server.count, tuple(c.id for c in cfg.clients))
        if world_size is not None and world_size != topo.world_size:
            raise ValueError(
                f"world size {world_size} does not match the config: {topo.num_servers} server "
                f"rank(s) + {len(topo.client_ids)} client rank(s) = {topo.world_size}; launch "
                f"with {topo.world_size} ranks (e.g. mpirun -np {topo.world_size}), pass --in-process, "
                "or edit 'clients'"
            )
        return topo

    @property
    def world_size(self) -> int:
        return self.num_servers + len(self.client_ids)

    def is_server(self, rank: int) -> bool:
        return rank < self.num_servers

    def client_index(self, rank: int) -> int:
        """Index into ``cfg.clients`` of a client rank."""
        assert not self.is_server(rank), rank
        return rank - self.num_servers

    def client_rank(self, index: int) -> int:
        return self.num_servers + index

    def server_of(self, client_index: int) -> int:
        """Rank of the server that serves client ``client_index``."""
        return client_index % self.num_servers

    def clients_of(self, server_rank: int) -> list[int]:
        """Client indices served by ``server_rank``, in the fixed order messages flow."""
        return [k for k in range(len(self.client_ids)) if self.server_of(k) == server_rank]

    def describe(self, rank: int) -> str:
        """Human name of a rank, e.g. ``rank 2 (client 'c1')``."""
        if self.is_server(rank):
            return f"rank {rank} (server {rank})"
        return f"rank {rank} (client {self.client_ids[self.client_index(rank)]!r})"


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
    kinds = {"server": 1, "client": 2, "stream": 3}
    return int(np.random.SeedSequence([base, kinds[rank_kind], index]).generate_state(1)[0])
