"""One run per output folder: a lock file with a heartbeat.

``<output_dir>/.lock`` names the job that owns the folder (a key shared by
all of its ranks, e.g. the rendezvous address), the host and pid of its rank
0, and is touched every few seconds. Every rank checks it before any
collective; a lock of another job is honoured while it is fresh and its
process may be alive, so a crashed or preempted job never blocks its own
requeue for long.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import socket
import threading
import time

from collafuse_hpc.atomic import atomic_path, process_alive, write_new

log = logging.getLogger("collafuse_hpc")

HEARTBEAT_S = 10.0  # how often the owner touches the lock
STALE_S = 60.0  # a lock untouched this long is abandoned


def _path(output_dir: str) -> str:
    return os.path.join(output_dir, ".lock")


def _alive(info: dict) -> bool:
    try:
        return process_alive(str(info.get("host")), int(info["pid"]))
    except (ValueError, KeyError, TypeError, OverflowError):  # a lock that names no pid: only its age tells
        return True


def _read(path: str) -> tuple[dict, os.stat_result] | None:
    """The lock at ``path`` and its file's status, read from one open file (so they
    describe the same file when another job replaces it meanwhile); None when there is
    none, {} for a lock that is not a JSON object. ValueError when it cannot be read."""
    try:
        with open(path) as f:
            st = os.fstat(f.fileno())
            try:
                info = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError):
                info = {}
            return (info if isinstance(info, dict) else {}), st
    except FileNotFoundError:
        return None
    except OSError as e:  # another user's lock (mkstemp's mode is 0600), a folder of that name
        raise ValueError(
            f"cannot read the run lock {path!r} ({e.strerror or e}): another user's job may run in that folder. "
            "Use another run.output_dir, or remove it if no job runs there"
        ) from None


def _refuse_if_held(output_dir: str, job: str, info: dict, st: os.stat_result) -> None:
    """ValueError if the lock ``info`` (its file's status ``st``) is another job's, fresh,
    and its process may be alive."""
    age = time.time() - st.st_mtime
    if info.get("job") != job and age < STALE_S and _alive(info):
        who = "a job its lock does not name ("  # a lock that is not JSON: taken over once stale
        if "job" in info:
            who = f"job {info['job']!r} (host {info.get('host')}, pid {info.get('pid')}, "
        raise ValueError(
            f"output folder {output_dir!r} is in use by {who}lock touched {age:.0f} s ago). Use another "
            f"run.output_dir, or wait; a lock untouched for {STALE_S:.0f} s is taken over"
        )


def _died_taking_over(output_dir: str, marker: str) -> ValueError:
    return ValueError(
        f"a job that took over the abandoned lock of {output_dir!r} died while doing so; if no job runs there, "
        f"remove {marker!r} and start again"
    )


def _marker(path: str, st: os.stat_result) -> str:
    """The takeover marker of the lock file ``path`` whose status is ``st``."""
    return f"{path}.takeover-{st.st_ino}-{st.st_mtime_ns}"


def check(output_dir: str, job: str, tidy: bool = True) -> None:
    """ValueError if another live job holds ``output_dir``, or a takeover of its lock was
    left half done (call on every rank). With ``tidy`` (not in a dry run, which writes
    nothing) a marker of a lock that is gone (its taker was stopped after replacing it)
    is removed."""
    path = _path(output_dir)
    found = _read(path)
    if found is not None:
        _refuse_if_held(output_dir, job, *found)
    current = _marker(path, found[1]) if found is not None else None
    for marker in glob.glob(glob.escape(path) + ".takeover-*"):
        with contextlib.suppress(FileNotFoundError):  # a takeover under way ends in microseconds
            if time.time() - os.path.getmtime(marker) < STALE_S:
                continue
            if marker != current:
                if tidy:
                    os.remove(marker)
                continue
            raise _died_taking_over(output_dir, marker)


def _take_over(output_dir: str, job: str, text: str) -> bool:
    """Replace the lock of ``output_dir`` with ``text`` if it is ours from before a requeue
    or abandoned; ValueError if a live job holds it, False to look again (it vanished, or
    another job is taking it over). Of jobs taking one abandoned lock at once exactly one
    succeeds: each first creates a marker named after that lock's file (inode and
    modification time), and only the marker's creator replaces the lock, only while it
    is still that file."""
    path = _path(output_dir)
    found = _read(path)
    if found is None:
        return False
    info, st = found
    _refuse_if_held(output_dir, job, info, st)
    marker = _marker(path, st)
    if not write_new(marker, text):
        taker = _read(marker)
        if taker is not None and time.time() - taker[1].st_mtime >= STALE_S:
            raise _died_taking_over(output_dir, marker)
        time.sleep(0.05)  # the other taker's lock, once it is in place, refuses this job
        return False
    try:
        now = _read(path)  # opened: on NFS a stat may answer from a cache
        if now is None:  # released meanwhile
            return False
        if (now[1].st_ino, now[1].st_mtime_ns) != (st.st_ino, st.st_mtime_ns):  # another taker was faster
            _refuse_if_held(output_dir, job, *now)
            return False
        with atomic_path(path) as tmp, open(tmp, "w") as f:
            f.write(text)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):  # check() removes a stale one of a lock that is gone
            os.remove(marker)


class RunLock:
    """Held by rank 0 for the whole run; a daemon thread keeps it fresh while it is still
    this job's (a job stalled past STALE_S, suspended say, may have lost it to another)."""

    def __init__(self, output_dir: str, job: str):
        check(output_dir, job)
        os.makedirs(output_dir, exist_ok=True)
        self.output_dir, self.path = output_dir, _path(output_dir)
        self.info = {"job": job, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        text = json.dumps(self.info)
        # a lock there: ours before a requeue, an abandoned one, or a job started with this one
        while not write_new(self.path, text) and not _take_over(output_dir, job, text):
            pass
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="lock-heartbeat", daemon=True)
        self._thread.start()

    def _ours(self) -> bool | None:
        """Whether the lock file is still the one this job wrote; None when it is gone or
        cannot be read."""
        try:
            found = _read(self.path)
        except ValueError:
            return None
        return None if found is None else found[0] == self.info

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            ours = self._ours()
            if ours is False:  # another job took the folder over: touching its lock would keep it from others
                log.warning(
                    "the run lock of %r is no longer this job's: another job took the folder over while this one "
                    "stalled for over %.0f s, and both may write into it",
                    self.output_dir,
                    STALE_S,
                )
                return
            with contextlib.suppress(OSError):  # a passing file-server error: the next beat tries again
                if ours is None:  # removed (by hand, say): put it back, unless another job's is there
                    write_new(self.path, json.dumps(self.info))
                else:
                    os.utime(self.path)

    def release(self) -> None:
        """Remove the lock, if it is still this job's."""
        self._stop.set()
        if self._ours():
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
