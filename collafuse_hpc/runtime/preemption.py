"""Preemption: SIGUSR1, SIGTERM or SIGINT asks every rank to stop at the next round boundary.

The signal only sets a flag. Every ``run.stop_check_every`` rounds all ranks agree on
it with one small non-blocking collective (``Wire.any_rank_later``, read at the next
check), write a complete checkpoint set,
flush their results and exit with :data:`EXIT_REQUEUE`, which the job scripts
turn into ``scontrol requeue``; the requeued job resumes from that set.
SLURM's ``--signal=B:USR1@120`` gives the lead time. A second SIGINT (Ctrl-C twice)
interrupts at once: the newest complete checkpoint set stays as it was.

That agreement needs every rank. A rank that has not joined the job yet (importing,
waiting for the rendezvous) or that waits on a peer which has failed never reaches it,
and a launcher's SIGTERM (torchrun's agent after a worker failed, ``scancel``) would
find it blocked until the launcher kills it. So a watcher thread, woken through
:func:`signal.set_wakeup_fd` even while the main thread waits inside torch, lets a rank
that is still checking its config finish the checks (for ``grace_s`` at most: when
every rank refuses a start, the launcher stops the slower ones as the first exits, and
each must report the refusal, not the signal), ends the process with
:data:`EXIT_REQUEUE` at once when it has not joined yet, and after that,
until the rounds end, when no progress (:meth:`StopRequest.progress`) came for ``grace_s`` after the
signal. It never ends the process inside :meth:`StopRequest.writing`, so no results
file is cut mid-write; the newest complete checkpoint set is always kept. Once the
ranks have agreed on the stop (or finished the last round) they are known to be
writing the set they end with, so the grace no longer runs: a rank waiting for a peer's
slow write of that set (a large optimizer state on a parallel file system) waits for
it; a peer that dies meanwhile is seen by the wire, one that hangs by its watchdog.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped cleanly, run again to continue


class Preempted(Exception):
    """Every rank stopped at a round boundary after a signal; a checkpoint set exists."""

    def __init__(self, round_: int, signal_name: str, during: str = ""):
        what = during or f"after round {round_}: checkpoint set written"
        super().__init__(
            f"stopped by {signal_name} {what}; exit {EXIT_REQUEUE}: run it again to continue (train with "
            "--resume; the job scripts requeue on this code)"
        )
        self.round, self.signal_name = round_, signal_name


SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """A flag set by SIGUSR1/SIGTERM/SIGINT while used as a context manager (main
    thread only); the previous handlers come back on exit.

    Phases, set by the runner: ``checking``, while the command reads its config and makes
    the checks before the start (a signal waits up to ``grace_s`` for them, so that a
    refused start reports its cause); ``starting``, until every rank has joined the job (a
    signal ends the process at once; a torchrun rank is in it before its checks too, while
    the ranks agree on their attempt); ``rounds``, until the ranks agree on a stop or
    end the last round (the process ends after ``grace_s`` seconds without progress);
    and ``finishing``, the checkpoint set every rank then writes, the final sampling and
    evaluation (only the flag: the evaluation checks it, the set and sampling run to
    their end).

    Args:
        grace_s: seconds without progress after a signal, during the rounds, before the
            watcher gives up on the agreed stop; while checking, the longest wait for the checks.
    """

    def __init__(self, grace_s: float = 5.0) -> None:
        self.signal_name: str | None = None
        self.grace_s = grace_s
        self.phase = "checking"
        self._previous: dict[int, object] = {}
        self._previous_fd = -1
        self._pipe: tuple[int, int] | None = None
        self._last_progress = time.monotonic()
        self._writing = threading.RLock()

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def progress(self) -> None:
        """The rank moved on (a round, a checkpoint set, a sampling batch began)."""
        self._last_progress = time.monotonic()

    def writing(self) -> threading.RLock:
        """Held while results or checkpoints are written: the watcher waits for it."""
        return self._writing

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is not threading.main_thread():
            return self
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        read, write = os.pipe()
        os.set_blocking(write, False)
        self._pipe = (read, write)
        self._previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(read,), name="stop-watcher", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if self._pipe is not None:
            signal.set_wakeup_fd(self._previous_fd)
            os.close(self._pipe[1])  # the watcher reads EOF and ends
            self._pipe = None

    def _handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt  # Ctrl-C twice: do not wait for the round boundary
        self.signal_name = signal.Signals(signum).name

    def _watch(self, read: int) -> None:
        """Runs in its own thread: wakes on each signal byte, ends the process when the
        agreed stop cannot come (see the module docstring)."""
        try:
            while True:
                got = os.read(read, 64)
                if not got:
                    return
                name = signal.Signals(got[-1]).name
                signalled = time.monotonic()
                while self.phase == "checking" and time.monotonic() - signalled < self.grace_s:
                    time.sleep(0.1)  # a refused start ends the process with its cause meanwhile, else checked()
                if self.phase in ("checking", "starting"):
                    self._exit_before_start(name)
                while self.phase == "rounds":
                    time.sleep(0.2)
                    if time.monotonic() - max(signalled, self._last_progress) > self.grace_s:
                        self._exit(
                            f"stopped by {name}: no progress for {self.grace_s:.0f} s after the signal (a peer "
                            "failed or stopped); the newest complete checkpoint set is kept: run again with "
                            "--resume=auto to continue"
                        )
        finally:
            os.close(read)

    def checked(self) -> None:
        """The checks before the start passed (the runner calls it): a signal that came
        during them, and any until the ranks have joined, ends the process now. A request
        that a caller of the Python API posted itself (no signal handler of this object's
        in place) is not a signal: it is taken at the first round's check, and the caller's
        process goes on."""
        self.phase = "starting"
        if self.requested and self._pipe is not None:
            self._exit_before_start(self.signal_name)

    def _exit_before_start(self, name: str) -> None:
        self._exit(
            f"stopped by {name} before training started; nothing of this run was written. A launcher stops every "
            "rank when one exits: if a rank reported an error, that is the cause; otherwise run the same command again"
        )

    def _exit(self, text: str) -> None:
        with self._writing:
            print(
                f"collafuse-hpc: stopped: {text} (exit {EXIT_REQUEUE})",
                file=sys.stderr,
                flush=True,
            )
            os._exit(EXIT_REQUEUE)
