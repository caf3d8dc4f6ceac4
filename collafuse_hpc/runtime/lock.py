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


def check(output_dir: str, job: str) -> None:
    """ValueError if another live job holds ``output_dir`` (call on every rank)."""
    path = _path(output_dir)
    try:
        with open(path) as f:
            info = json.load(f)
        age = time.time() - os.path.getmtime(path)
    except (FileNotFoundError, json.JSONDecodeError, OSError):
        return
    if info.get("job") != job and age < STALE_S and _alive(info):
        raise ValueError(
            f"output folder {output_dir!r} is in use by job {info.get('job')!r} (host {info.get('host')}, "
            f"pid {info.get('pid')}, lock touched {age:.0f} s ago). Use another run.output_dir, or wait; "
            f"a lock untouched for {STALE_S:.0f} s is taken over"
        )


class RunLock:
    """Held by rank 0 for the whole run; a daemon thread keeps it fresh."""

    def __init__(self, output_dir: str, job: str):
        check(output_dir, job)
        os.makedirs(output_dir, exist_ok=True)
        self.path = _path(output_dir)
        info = {"job": job, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        text = json.dumps(info)
        if not write_new(self.path, text):  # ours before a requeue, an abandoned one, or a job started with this one
            check(output_dir, job)
            with atomic_path(self.path) as tmp, open(tmp, "w") as f:
                f.write(text)
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
