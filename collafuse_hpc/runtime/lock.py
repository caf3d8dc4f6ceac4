"""One run per output folder: a lock file with a heartbeat.

``<output_dir>/.lock`` names the job that owns the folder (a key shared by
all of its ranks, e.g. the rendezvous address), the host and pid of its rank
0, and is touched every few seconds. Every rank checks it before any
collective; a lock of another job is honoured while it is fresh and its
process may be alive, so a crashed or preempted job never blocks its own
requeue for long.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

from collafuse_hpc.atomic import atomic_path, write_new

HEARTBEAT_S = 10.0  # how often the owner touches the lock
STALE_S = 60.0  # a lock untouched this long is abandoned


def _path(output_dir: str) -> str:
    return os.path.join(output_dir, ".lock")


def _alive(info: dict) -> bool:
    if info.get("host") == socket.gethostname():
        try:
            os.kill(int(info["pid"]), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, ValueError, KeyError):
            return True
    return True


def _read(path: str) -> tuple[dict, os.stat_result] | None:
    """The lock at ``path`` and its file's status, read from one open file (so they
    describe the same file when another job replaces it meanwhile); None when there is none."""
    try:
        with open(path) as f:
            return json.load(f), os.fstat(f.fileno())
    except (FileNotFoundError, json.JSONDecodeError, OSError):
        return None


def _refuse_if_held(output_dir: str, job: str, info: dict, st: os.stat_result) -> None:
    age = time.time() - st.st_mtime
    if info.get("job") != job and age < STALE_S and _alive(info):
        raise ValueError(
            f"output folder {output_dir!r} is in use by job {info.get('job')!r} (host {info.get('host')}, "
            f"pid {info.get('pid')}, lock touched {age:.0f} s ago). Use another run.output_dir, or wait; "
            f"a lock untouched for {STALE_S:.0f} s is taken over"
        )


def check(output_dir: str, job: str) -> None:
    """ValueError if another live job holds ``output_dir`` (call on every rank)."""
    found = _read(_path(output_dir))
    if found is not None:
        _refuse_if_held(output_dir, job, *found)


def _take_over(output_dir: str, job: str, text: str) -> bool:
    """Replace the lock of ``output_dir`` with ``text`` if it is ours from before a requeue
    or abandoned; ValueError if a live job holds it, False if it vanished meanwhile (try
    again). Of jobs taking one abandoned lock at once exactly one succeeds: each first
    creates a marker named after that lock's file (inode and modification time), and only
    the marker's creator replaces the lock, only while it is still that file."""
    path = _path(output_dir)
    found = _read(path)
    if found is None:
        return False
    info, st = found
    _refuse_if_held(output_dir, job, info, st)
    marker = f"{path}.takeover-{st.st_ino}-{st.st_mtime_ns}"
    if not write_new(marker, text):
        taker = _read(marker)
        if taker is not None and time.time() - taker[1].st_mtime >= STALE_S:
            raise ValueError(
                f"a job that took over the abandoned lock of {output_dir!r} died while doing so; "
                f"if no job runs there, remove {marker!r} and start again"
            )
        who = taker[0].get("job") if taker else None
        raise ValueError(
            f"output folder {output_dir!r} is being taken over by job {who!r}, started with this one. "
            "Use another run.output_dir, or wait for it to end"
        )
    try:
        now = os.stat(path)
        if (now.st_ino, now.st_mtime_ns) != (st.st_ino, st.st_mtime_ns):  # another taker was faster
            check(output_dir, job)
            return False
        with atomic_path(path) as tmp, open(tmp, "w") as f:
            f.write(text)
        return True
    except FileNotFoundError:  # released meanwhile
        return False
    finally:
        os.remove(marker)


class RunLock:
    """Held by rank 0 for the whole run; a daemon thread keeps it fresh."""

    def __init__(self, output_dir: str, job: str):
        check(output_dir, job)
        os.makedirs(output_dir, exist_ok=True)
        self.path = _path(output_dir)
        info = {"job": job, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        text = json.dumps(info)
        # a lock there: ours before a requeue, an abandoned one, or a job started with this one
        while not write_new(self.path, text) and not _take_over(output_dir, job, text):
            pass
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
