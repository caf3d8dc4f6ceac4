"""Liveness. :class:`Watchdog` is the last line of defence against a hang that no
timeout covers (a NCCL collective or a CUDA kernel that never returns, a
deadlock): a daemon thread ends the process when its rank makes no progress for
``limit_s`` seconds. Every wait on the wire is already bounded; the watchdog only
fires when something below the wire stops returning. (A dead peer while no
message is expected from it is the wire's Heartbeat, in dist_wire.py.)
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

    def stalled(self, now: float | None = None) -> str | None:
        """The stall report if no beat came for ``limit_s`` before ``now`` (monotonic
        seconds, default: now), else None."""
        idle = (time.monotonic() if now is None else now) - self._last
        if idle <= self.limit_s:
            return None
        return f"{self.name}: no progress for {idle:.0f} s during {self._what}; aborting this rank"

    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, self.limit_s / 4)):
            report = self.stalled()
            if report:
                self.on_stall(report)
                return
