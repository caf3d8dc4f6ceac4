"""The results file: ``results.h5`` plus one part file per role.

Each rank writes only its own part (``parts/server_<rank>.h5`` or
``parts/client_<id>.h5``), opening it just long enough to append, so a crash
of any rank leaves every file readable. ``results.h5`` is written once by
rank 0 at start and links the parts with HDF5 external links, so plain h5py
(``f["clients/c0/rounds/loss_local"]``) and h5dump read it without this package.

Layout::

    results.h5            attrs: schema="collafuse-results", schema_version, config (YAML),
                          package_version, torch_version, seed, roles (YAML), created
      /server             -> parts/server_0.h5
      /clients/<id>       -> parts/client_<id>.h5
    part file             attrs: role, rank, host, pid, (client_id, t_c, cut_ratio)
      /rounds/<metric>    float64 [R], one row per logged round; attr ``unit``
                          (round: the round index; loss_*: mean squared error;
                          time_*: seconds; images_per_s: images per second)
      /samples/images     uint8 [n, C, H, W] final collaborative samples (clients)
      /samples/x_handover float32 [n, C, H, W] what the server returned at the cut
      /audit/<field>      int64 [M] one row per message that left the client, over
                          all runs of this output folder: round, kind (wire.Kind
                          value), images, t_c, nbytes; attrs hold the totals
      /summary            attrs: totals and rates of the run for this role
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time

import h5py
import numpy as np
import torch
import yaml
from PIL import Image

from . import __version__

SCHEMA = "collafuse-results"
SCHEMA_VERSION = 1
UNITS = {
    "round": "index",
    "loss": "mean squared error",
    "time": "s",
    "images_per_s": "images/s",
    "nbytes": "bytes",
    "images": "count",
}


def part_name(role: str, name: str) -> str:
    """File name of a role's part, e.g. ``client_c0.h5``."""
    return f"{role}_{name}.h5"


def create_index(path: str, config_yaml: str, seed: int, roles: dict[str, str]) -> None:
    """Write results.h5 (rank 0, once per run): attributes and links to the parts.

    Args:
        roles: {"server": "parts/server_0.h5", "clients/<id>": "parts/client_<id>.h5", ...}
    """
    tmp = path + ".tmp"
    with h5py.File(tmp, "w") as f:
        f.attrs.update(
            schema=SCHEMA,
            schema_version=SCHEMA_VERSION,
            config=config_yaml,
            package_version=__version__,
            torch_version=str(torch.__version__),
            seed=seed,
            roles=yaml.safe_dump(roles),
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        for key, part in roles.items():
            f[key] = h5py.ExternalLink(part, "/")
    os.replace(tmp, path)


def record_config(path: str, config_yaml: str) -> None:
    """A resumed run's config replaces the one results.h5 holds (they differ only in
    keys that may change on resume: rounds, logging, devices, ...)."""
    with _writing(path) as f:
        f.attrs["config"] = config_yaml


def _open(path: str, mode: str) -> h5py.File:
    """Open a part file without HDF5's file lock: someone reading results of a live
    run (h5dump, tools/, a notebook) must never make a training rank fail."""
    return h5py.File(path, mode, locking=False)


RESERVE_BYTES = 4 << 20  # free space below which results are not written (HDF5 breaks files on a full disk)


@contextlib.contextmanager
def _writing(path: str, mode: str = "a"):
    """Open ``path`` to write; OSError naming the file when it cannot be.

    HDF5 can leave a file unreadable when a write fails half-way for lack of space,
    so nothing is written with less than RESERVE_BYTES free: the rows written
    before stay readable."""
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    if free < RESERVE_BYTES:
        raise OSError(
            errno.ENOSPC,
            f"no space left to write results to {path!r}: {free} bytes free, {RESERVE_BYTES} needed to write "
            "safely. The rows written before are kept; free space (or move run.output_dir), then continue "
            "with --resume",
        )
    try:
        with _open(path, mode) as f:
            yield f
    except OSError as e:
        raise OSError(e.errno, f"cannot write results to {path!r}: {str(e).splitlines()[0]}") from None


class RoleResults:
    """Append-only writer of one role's part file.

    Rows are buffered per group (``rounds``, ``audit``) and appended by
    :meth:`flush`; each column is one extendable dataset.

    Args:
        path: the part file.
        attrs: written on the root group.
        resume_round: when resuming, rows of every group whose ``round`` is at
            or after this round are dropped (those rounds will run again).
    """

    def __init__(self, path: str, attrs: dict, resume_round: int | None = None):
        self.path = path
        self._rows: dict[str, list[dict[str, float]]] = {}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with _writing(path, "a" if resume_round is not None else "w") as f:
            f.attrs.update(attrs)
            for group in f.values():
                if resume_round is not None and isinstance(group, h5py.Group) and "round" in group:
                    keep = int((group["round"][()] < resume_round).sum())
                    for ds in group.values():
                        ds.resize((keep,))

    def log(self, row: dict[str, float], group: str = "rounds") -> None:
        """Buffer one row (column name -> value) of ``group``; :meth:`flush` writes it."""
        self._rows.setdefault(group, []).append(row)

    def flush(self) -> None:
        pending, self._rows = self._rows, {}
        if not pending:
            return
        with _writing(self.path) as f:
            for group, rows in pending.items():
                g = f.require_group(group)
                for name in rows[0]:
                    values = np.array([r[name] for r in rows])
                    values = values.astype(np.int64 if values.dtype.kind in "iub" else np.float64)
                    if name not in g:
                        g.create_dataset(name, shape=(0,), maxshape=(None,), dtype=values.dtype, chunks=(1024,))
                        g[name].attrs["unit"] = UNITS.get(name.split("_")[0], UNITS.get(name, ""))
                    ds = g[name]
                    ds.resize((ds.shape[0] + len(values),))
                    ds[-len(values) :] = values

    def column(self, group: str, name: str) -> np.ndarray:
        """All values written so far of ``group/name`` (empty if none)."""
        with _open(self.path, "r") as f:
            return f[group][name][()] if group in f and name in f[group] else np.zeros(0)

    def write(self, name: str, data: np.ndarray, **attrs) -> None:
        """Write (or replace) dataset ``name`` with optional attributes."""
        with _writing(self.path) as f:
            if name in f:
                del f[name]
            ds = f.create_dataset(name, data=data)
            ds.attrs.update(attrs)

    def write_attrs(self, group: str, attrs: dict) -> None:
        with _writing(self.path) as f:
            f.require_group(group).attrs.update(attrs)


def save_grid(images: np.ndarray, path: str, columns: int = 8) -> None:
    """Save uint8 [n, C, H, W] images (C = 1 or 3) as one PNG grid."""
    n, c, h, w = images.shape
    rows = -(-n // columns)
    grid = np.zeros((rows * (h + 2) + 2, columns * (w + 2) + 2, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        grid[2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + col * (w + 2) : 2 + col * (w + 2) + w] = img.transpose(1, 2, 0)
    scale = max(1, 256 // max(grid.shape[:2]) + 1)
    picture = Image.fromarray(grid[..., 0] if c == 1 else grid)
    picture.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)
