"""Liveness. :class:`Watchdog` is the last line of defence against a hang that no
timeout covers (a NCCL collective or a CUDA kernel that never returns, a
deadlock): a daemon thread ends the process when its rank makes no progress for
``limit_s`` seconds. Every wait on the wire is already bounded; the watchdog only
fires when something below the wire stops returning. :class:`Heartbeat` lets a
rank that is computing for its peers (the server sampling) see one of them die.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable


def _abort(message: str) -> None:
    print(f"collafuse-hpc: error: {message}", file=sys.stderr, flush=True)
    os._exit(1)


class Watchdog:
    """Call :meth:`beat` whenever the rank makes progress.

    Args:
        name: who is watched, e.g. ``rank 2 (client 'c1')``.
        limit_s: seconds without a beat before ``on_stall`` runs.
        on_stall: what to do (default: print and exit 1 at once).
    """

    def __init__(self, name: str, limit_s: float, on_stall: Callable[[str], None] = _abort):
        self.name, self.limit_s, self.on_stall = name, limit_s, on_stall
        self._last, self._what = time.monotonic(), "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
        self._thread.start()

    def beat(self, what: str) -> None:
        """Record progress; ``what`` names the phase now starting (shown if it stalls)."""
        self._last, self._what = time.monotonic(), what

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, self.limit_s / 4)):
            idle = time.monotonic() - self._last
            if idle > self.limit_s:
                self.on_stall(f"{self.name}: no progress for {idle:.0f} s during {self._what}; aborting this rank")
                return


class Heartbeat:
    """Sees a dead peer while no message is expected from it (the server sampling
    for its clients), without touching the data connections.

    Every rank bumps its counter in the rendezvous store every ``period_s`` from a
    daemon thread, over a store connection of its own; :meth:`silent` names the
    peers whose counter has not moved for ``limit_s`` seconds.

    Args:
        connect: returns a new client of the rendezvous store (called twice).
        rank: this rank.
    """

    def __init__(self, connect: Callable[[], object], rank: int, period_s: float = 1.0, limit_s: float = 10.0):
        self.rank, self.period_s, self.limit_s = rank, period_s, limit_s
        self._beats, self._reads = connect(), connect()  # one connection per thread
        self._seen: dict[int, tuple[int, float]] = {}  # peer -> (counter, when it last moved)
        self._last_check = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self._thread.start()

    @staticmethod
    def _key(rank: int) -> str:
        return f"collafuse/heartbeat/{rank}"

    def _beat(self) -> None:
        while not self._stop.is_set():
            try:
                self._beats.add(self._key(self.rank), 1)
            except RuntimeError:  # the store's rank has gone: the wire reports that
                return
            self._stop.wait(self.period_s)

    def silent(self, peers: list[int]) -> list[int]:
        """Peers silent for ``limit_s`` (checked at most once per ``period_s``; [] in between).
        Raises RuntimeError when the store itself cannot be reached."""
        now = time.monotonic()
        if now - self._last_check < self.period_s:
            return []
        self._last_check = now
        out = []
        for p in peers:
            count = int(self._reads.add(self._key(p), 0))
            last_count, since = self._seen.get(p, (-1, now))
            if count != last_count:
                self._seen[p] = (count, now)
            elif now - since > self.limit_s:
                out.append(p)
        return out

    def stop(self) -> None:
        self._stop.set()
