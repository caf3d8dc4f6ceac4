"""Preemption: SIGUSR1, SIGTERM or SIGINT asks every rank to stop at the next round boundary.

The signal only sets a flag. Every ``run.stop_check_every`` rounds all ranks agree on
it with one small non-blocking collective (``Wire.any_rank_later``, read at the next
check), write a complete checkpoint set,
flush their results and exit with :data:`EXIT_REQUEUE`, which the job scripts
turn into ``scontrol requeue``; the requeued job resumes from that set.
SLURM's ``--signal=B:USR1@120`` gives the lead time. A second SIGINT (Ctrl-C twice)
interrupts at once: the newest complete checkpoint set stays as it was.
"""

from __future__ import annotations

import signal
import threading

EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped cleanly, run again to continue


class Preempted(Exception):
    """Every rank stopped at a round boundary after a signal; a checkpoint set exists."""

    def __init__(self, round_: int, signal_name: str, during: str = ""):
        what = during or f"after round {round_}: checkpoint set written"
        super().__init__(
            f"stopped by {signal_name} {what}; exit {EXIT_REQUEUE} so the job is requeued (continue with --resume)"
        )
        self.round = round_


SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """A flag set by SIGUSR1/SIGTERM/SIGINT while used as a context manager (main
    thread only); the previous handlers come back on exit."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt  # Ctrl-C twice: do not wait for the round boundary
        self.signal_name = signal.Signals(signum).name
