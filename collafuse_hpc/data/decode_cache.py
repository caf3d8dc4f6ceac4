"""prepare's cache of decoded images: ``<out>/.cache/<key>/``, one file per batch.

Decoding a large dataset takes hours, so a stopped or failed preparation continues from
what was decoded. Each batch is one ``.npz`` file written whole (:func:`atomic_path`):
a kill, a crash or a full disk at any moment leaves every earlier batch readable, and a
full disk is an ordinary OSError. (An HDF5 file appended in place could be left
unreadable by a failed flush, and crashed the process when closed after it.)
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import zipfile

import numpy as np

from collafuse_hpc.atomic import atomic_path, dead_temporary, made_folder, write_error

PENDING, DONE, FAILED = 0, 1, 2  # per catalog image
_BATCH = re.compile(r"batch-\d+-\d+\.npz")


class DecodeCache:
    """What is known of each catalog image: ``state`` (PENDING, DONE or FAILED), ``side``
    (the crop side used, source pixels) and ``stamp`` (the source file's size and mtime
    in ns when it was decoded), and where its pixels are. A batch written later wins."""

    def __init__(self, folder: str, images: int, shape: tuple[int, ...]) -> None:
        self.folder, self.shape = folder, shape
        self.state = np.full(images, PENDING, np.int8)
        self.side = np.zeros(images, np.int32)
        self.stamp = np.full((images, 2), -1, np.int64)
        self._where: dict[int, tuple[str, int]] = {}  # catalog index -> (batch file, row)
        self._held: dict[str, int] = {}  # batch file -> how many images' newest pixels it holds
        names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        for name in filter(dead_temporary, names):  # a killed run's half-written batch
            _remove(os.path.join(folder, name))
        for name in filter(_BATCH.fullmatch, names):  # by the time in their names: oldest first
            path = os.path.join(folder, name)
            try:
                with np.load(path) as z:
                    index, state, side, stamp = (z[k] for k in ("index", "state", "side", "stamp"))
            except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # not ours: its images are decoded again
                continue
            if len(index) and (index.min() < 0 or index.max() >= images):
                continue
            self._take(path, index, state, side, stamp)
        for path in {os.path.join(folder, n) for n in filter(_BATCH.fullmatch, names)} - self._held.keys():
            _remove(path)  # unreadable, or each of its images decoded again since

    def _take(self, path: str, index: np.ndarray, state: np.ndarray, side: np.ndarray, stamp: np.ndarray) -> None:
        """Record a batch; remove the batch files it leaves holding no image's newest pixels:
        the cache keeps one copy of each image however often its source changes."""
        self.state[index], self.side[index], self.stamp[index] = state, side, stamp
        self._held[path] = len(index)
        for row, i in enumerate(index):
            old = self._where.get(int(i))
            self._where[int(i)] = (path, row)
            if old is not None:
                self._held[old[0]] -= 1
                if not self._held[old[0]]:
                    del self._held[old[0]]
                    _remove(old[0])

    def add(
        self, index: np.ndarray, state: np.ndarray, side: np.ndarray, stamp: np.ndarray, images: np.ndarray
    ) -> None:
        """Store one batch: catalog ``index`` [n], ``state`` [n], crop ``side`` [n], source
        ``stamp`` [n, 2] and uint8 ``images`` [n, *shape] (zeros where the state is FAILED).
        Raises WriteError when it cannot be written; the batches before stay."""
        path = os.path.join(self.folder, f"batch-{time.time_ns():020d}-{os.getpid()}.npz")
        try:  # the cache's folders go again if its first batch fails
            with made_folder(self.folder), atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, index=index, state=state, side=side, stamp=stamp, images=images)
        except OSError as e:
            raise write_error(e, path) from e
        self._take(path, index, state, side, stamp)

    def read(self, index: np.ndarray, out: np.ndarray) -> None:
        """Put the pixels of catalog images ``index`` into ``out`` [len(index), *shape], where DONE."""
        rows: dict[str, list[tuple[int, int]]] = {}
        for k, i in enumerate(index):
            if self.state[i] != DONE:
                continue
            path, row = self._where[int(i)]
            rows.setdefault(path, []).append((k, row))
        for path, pairs in rows.items():
            try:
                with np.load(path) as z:
                    stored = z["images"]
            except FileNotFoundError:
                raise ValueError(
                    f"the decoded-image cache file {path!r} was removed while this command ran (another prepare "
                    "into the same --out?); run the same command again: its images are decoded again"
                ) from None
            except (OSError, ValueError, zipfile.BadZipFile) as e:
                raise ValueError(
                    f"the decoded-image cache file {path!r} is damaged ({e}); remove it and run the same command "
                    "again: its images are decoded again"
                ) from None
            k, row = (np.array(v) for v in zip(*pairs))
            out[k] = stored[row]


def _remove(path: str) -> None:
    """Remove a cache file no image needs; one already gone (removed above) is fine."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
