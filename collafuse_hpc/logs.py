"""Log lines and progress.

Every line carries the time, the level and the rank (``12:00:01 INFO [rank 2]
...``), so the interleaved output of many ranks in one SLURM log can be told
apart and filtered. Steps that take hours at CelebA scale (sampling,
evaluation, ``prepare``) report images done, rate and time left through
:class:`Progress`.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

log = logging.getLogger("collafuse_hpc")

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def setup(rank: int | None, level: str = "INFO") -> None:
    """Log to stderr with time, level and rank (no rank outside a launched job); the
    package's lines from ``level`` up. (A handler that is already there, such as a
    test's, is kept.)"""
    where = f" [rank {rank}]" if rank is not None else ""
    logging.basicConfig(format=f"%(asctime)s %(levelname)s{where} %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    log.setLevel(level)


class Progress:
    """Logs ``<what>: <done>/<total> images, <rate> images/s, <left> s left`` when it
    starts, at most every ``every_s`` seconds, and once at the end.

    Args:
        what: the step, e.g. "sampling for 2 clients".
        total: images the step will produce.
    """

    def __init__(self, what: str, total: int, every_s: float = 10.0):
        self.what, self.total, self.every_s = what, total, every_s
        self.done = 0
        self._t0 = self._last = time.perf_counter()
        log.info("%s: 0/%d images%s", what, total, ", nothing to do" if total == 0 else "")

    def update(self, images: int, note: str = "") -> None:
        """``images`` more are done; ``note`` is appended to the line (e.g. failures)."""
        self.done += images
        now = time.perf_counter()
        if now - self._last < self.every_s and self.done < self.total:
            return
        self._last = now
        rate = self.done / max(now - self._t0, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        log.info(
            "%s: %d/%d images, %.1f images/s, %s%s",
            self.what,
            self.done,
            self.total,
            rate,
            "done" if self.done >= self.total else f"{left:.0f} s left",
            f", {note}" if note else "",
        )


def few(names: list[str], shown: int = 3) -> str:
    """``c0, c1, c2 and 5 more``: a list of names short enough for a log line."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


class Heartbeat:
    """Within ``with Heartbeat(what) as beat:``, logs ``<what>: still <stage> (<s> s)``
    whenever the package has logged nothing for ``every_s`` seconds. Some steps report
    no progress of their own for minutes (a whole sampling chain in one batch, an attack,
    a timing measurement); ``beat.at("...")`` names the one under way.
    """

    def __init__(self, what: str, every_s: float = 10.0):
        self.what, self.every_s, self.stage = what, every_s, "starting"
        self._since = self._last = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def at(self, stage: str) -> None:
        """``stage`` is under way from now on."""
        self.stage, self._since = stage, time.perf_counter()

    def filter(self, record: logging.LogRecord) -> bool:
        """A logging filter on the package's logger: every line it passes resets the wait."""
        self._last = time.perf_counter()
        return True

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.every_s / 4)):
            now = time.perf_counter()
            if now - self._last >= self.every_s:
                log.info("%s: still %s (%.0f s)", self.what, self.stage, now - self._since)

    def __enter__(self) -> Heartbeat:
        log.addFilter(self)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        log.removeFilter(self)
