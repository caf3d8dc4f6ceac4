"""Writing results: ``results.h5`` (rank 0, once), each role's part file
(append-only, by that role's rank), and the self-contained bundle of a run.
The layout is :mod:`.schema`'s."""

from __future__ import annotations

import contextlib
import errno
import os
import shlex
import sys
import time
from collections.abc import Iterator

import h5py
import numpy as np
import torch
import yaml
from PIL import Image

from collafuse_hpc.atomic import check_destination, free_space, made_folder, new_hdf5, refuse_existing
from collafuse_hpc.results.schema import (
    BUNDLED,
    METRICS,
    PART_ERRORS,
    RECORDS,
    ROUND,
    ROUNDS,
    SCHEMA,
    SCHEMA_VERSION,
    SUMMARY,
    V2,
    audit_totals,
    lost_role,
    open_results,
    open_role,
    plain_attrs,
    record_key,
    record_numbers,
    units,
)
from collafuse_hpc.results.tensorboard import ScalarSink
from collafuse_hpc.version import __version__


def create_index(path: str, config_yaml: str, seed: int, roles: dict[str, str]) -> None:
    """Write results.h5 (rank 0, once per run): attributes and links to the parts.

    Args:
        roles: {"server": "parts/server_0.h5", "clients/<id>": "parts/client_<id>.h5", ...}
    """
    with new_hdf5(path) as f:
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


def record_config(path: str, config_yaml: str) -> None:
    """A resumed run's config replaces the one results.h5 holds (they differ only in
    keys that may change on resume: rounds, logging, devices, ...)."""
    with _writing(path) as f:
        f.attrs["config"] = config_yaml


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def begin_record(
    index: str,
    command: str,
    checkpoint_round: int,
    settings: dict,
    ignored: dict | None = None,
    started: str | None = None,
) -> int:
    """Append the record of one invocation that writes into the run (rank 0 of train,
    resume or sample; evaluate); returns its number. ``settings``: the keys that differ
    from the training config (config.changed_keys); ``ignored``: the keys set that the
    run's method ignores (config_rules.ignored_keys); ``started``: when it started, if
    not now (evaluate records its metrics when it has them)."""
    with _writing(index) as f:
        n = len(record_numbers(f))
        f.create_group(record_key(n)).attrs.update(
            command=command,
            argv=shlex.join(sys.argv),
            started=started or _now(),
            finished="",
            checkpoint_round=checkpoint_round,
            settings=yaml.safe_dump(settings, sort_keys=True),
            ignored=yaml.safe_dump(ignored or {}, sort_keys=True),
            totals="",
        )
    return n


def finish_record(index: str, n: int, totals: dict) -> None:
    """Mark record ``n`` finished, with what it did (YAML totals)."""
    with _writing(index) as f:
        f[record_key(n)].attrs.update(finished=_now(), totals=yaml.safe_dump(totals, sort_keys=True))


def record_metrics(index: str, n: int, attrs: dict, sets: dict[str, dict[str, dict]], grids: dict) -> None:
    """Write an evaluation's metrics into record ``n`` and point /metrics at them (the
    metrics of earlier evaluations stay in their records).

    Args:
        attrs: the metrics group's attributes (extractor, checkpoint_round, ...).
        sets: {client id | "pooled": {set name: its attributes}}.
        grids: {(client id | "pooled", set name): uint8 [n, C, H, W] images scored}.
    """
    target = record_key(n, METRICS)
    with _writing(index) as f:
        g = f.create_group(target)
        g.attrs.update(attrs, record=n)
        for who, entry in sets.items():
            for name, values in entry.items():
                sub = g.create_group(f"{who}/{name}")
                sub.attrs.update(values)
                if (who, name) in grids:
                    sub.create_dataset("images", data=grids[(who, name)])
        point_newest(f, METRICS, target)


def point_newest(f: h5py.File, name: str, target: str) -> None:
    """Make the root's ``name`` a soft link to ``target`` (relative to the root, so it
    still resolves where the file is copied into a bundle), the newest of several sets:
    readers of the fixed path keep working. A schema v2 group there is moved to records/v2."""
    link = f.get(name, getlink=True)
    if isinstance(link, h5py.HardLink):
        f.move(name, record_key(V2, name))
    elif link is not None:
        del f[name]
    f[name] = h5py.SoftLink(target)


V2_SUMMARY = record_key(V2, SUMMARY)  # a schema v2 run's training totals, kept when it trains on
# what adds up over training invocations; a key with invocation_<key> beside it is over the run already (a
# client's bytes_sent, the audit's): the newest's
SUMMED = ("images", "rounds_run", "bytes_received", "bytes_sent", "updates", "images_sampled")
SUMMED_PREFIX = ("time_", "invocation_")


def combine_summaries(parts: list[dict]) -> dict:
    """One role's training summary over several invocations (oldest first): times, images,
    rounds, bytes, updates averaged and what each invocation sent add up, rates are
    recomputed, the rest is the newest's that has it (a stopped invocation sampled
    nothing: the sampling figures stay those of the last that did)."""
    out = {key: value for part in parts for key, value in part.items()}
    for key in out:
        if (key in SUMMED and f"invocation_{key}" not in out) or key.startswith(SUMMED_PREFIX):
            out[key] = sum(p.get(key, 0) for p in parts)
    if "gpu_peak_memory_bytes" in out:
        out["gpu_peak_memory_bytes"] = max(p.get("gpu_peak_memory_bytes", 0) for p in parts)
    if "images_per_s" in out:  # a role that denoises images (not a federated server, which averages)
        busy = out.get("time_round_s", sum(out.get(k, 0.0) for k in ("time_recv_s", "time_compute_s", "time_send_s")))
        out["images_per_s"] = out.get("images", 0) / busy if busy else 0.0
    out["invocations"] = len(parts)
    return out


def _open(path: str, mode: str) -> h5py.File:
    """Open a part file without HDF5's file lock: someone reading results of a live
    run (h5dump, tools/, a notebook) must never make a training rank fail."""
    return h5py.File(path, mode, locking=False)


RESERVE_BYTES = 4 << 20  # free space below which results are not written (HDF5 breaks files on a full disk)


def check_space(path: str) -> None:
    """OSError (ENOSPC) when less than RESERVE_BYTES are free where ``path`` is written."""
    free = free_space(path)
    if free < RESERVE_BYTES:
        raise OSError(
            errno.ENOSPC,
            f"no space left to write results to {path!r}: {free} bytes free, {RESERVE_BYTES} needed to write "
            "safely. The results written before are kept; free space (or move run.output_dir), then run the "
            "command again (train with --resume)",
        )


@contextlib.contextmanager
def _writing(path: str, mode: str = "a"):
    """Open ``path`` to write; OSError naming the file when it cannot be.

    HDF5 can leave a file unreadable when a write fails half-way for lack of space,
    so nothing is written with less than RESERVE_BYTES free: the rows written
    before stay readable."""
    check_space(path)
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
        mirror: also gets every ``rounds`` row (TensorBoard), when given.
        resume_round: when resuming, ``rounds`` rows at or after this round are
            dropped (those rounds will run again). The audit keeps every row: what
            was sent in them left the client.
    """

    def __init__(
        self,
        path: str,
        attrs: dict,
        resume_round: int | None = None,
        mirror: ScalarSink | None = None,
    ):
        self.path, self.mirror = path, mirror
        self._rows: dict[str, list[dict[str, float]]] = {}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with _writing(path, "a" if resume_round is not None else "w") as f:
            f.attrs.update(attrs)
            rows = f.get(ROUNDS)
            if resume_round is not None and rows is not None and ROUND in rows:
                keep = int((rows[ROUND][()] < resume_round).sum())
                for ds in rows.values():
                    ds.resize((keep,))

    def audit_totals(self) -> dict[str, int]:
        """What the audit rows written so far count as sent (schema.audit_totals)."""
        with _open(self.path, "r") as f:
            return audit_totals(f)

    def log(self, row: dict[str, float], group: str = "rounds") -> None:
        """Buffer one row (column name -> value) of ``group``; :meth:`flush` writes it."""
        self._rows.setdefault(group, []).append(row)
        if group == ROUNDS and self.mirror is not None:
            self.mirror(row)

    def flush(self) -> None:
        if self.mirror is not None:
            self.mirror.flush()
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
                        self._create_column(g, name, values.dtype)
                    ds = g[name]
                    ds.resize((ds.shape[0] + len(values),))
                    ds[-len(values) :] = values

    @staticmethod
    def _create_column(g: h5py.Group, name: str, dtype) -> None:
        """An extendable column with its ``units``, on the group's round axis."""
        ds = g.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(1024,))
        ds.attrs["units"] = units(name)
        if ROUND in g:
            _attach_round_scale(g)

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

    def write_set(self, record: int, group: str, datasets: dict[str, tuple[np.ndarray, dict]], attrs: dict) -> None:
        """Write ``{name: (data, attrs)}`` under records/<record>/<group> (``attrs`` on
        the group) and point /<group> at it: the newest set."""
        target = record_key(record, group)
        with _writing(self.path) as f:
            if target in f:
                del f[target]
            g = f.create_group(target)
            g.attrs.update(attrs)
            for name, (data, ds_attrs) in datasets.items():
                g.create_dataset(name, data=data).attrs.update(ds_attrs)
            point_newest(f, group, target)

    def write_summary(self, record: int, summary: dict, trained: bool) -> None:
        """This invocation's totals under records/<record>/summary; after training, the
        role's /summary becomes the sum over its training invocations. A run of schema v2
        kept its training's totals only in /summary: they move to records/v2/summary, where
        every later sum finds them, and count as one invocation."""
        with _writing(self.path) as f:
            g = f.require_group(record_key(record, SUMMARY))
            g.attrs.update(summary)
            f[record_key(record)].attrs["trained"] = trained
            if not trained:
                return
            if SUMMARY in f and "invocations" not in f[SUMMARY].attrs:  # schema v2's, not yet a sum
                f.move(SUMMARY, V2_SUMMARY)
            trainings = [n for n in record_numbers(f) if f[record_key(n)].attrs.get("trained", False)]
            parts = [plain_attrs(f[V2_SUMMARY])] if V2_SUMMARY in f else []
            parts += [plain_attrs(f[record_key(n, SUMMARY)]) for n in trainings]
            if SUMMARY in f:
                del f[SUMMARY]
            f.create_group(SUMMARY).attrs.update(combine_summaries(parts))


_SCALE_ATTRS = ("DIMENSION_LIST", "REFERENCE_LIST", "CLASS", "NAME")  # HDF5's dimension scale bookkeeping


def _attach_round_scale(g: h5py.Group) -> None:
    """Make the ``round`` column of a row group its dimension scale and attach every
    other column to it (xarray and HDFView read it as the rows' coordinate)."""
    scale = g[ROUND]
    if not scale.is_scale:
        scale.make_scale(ROUND)
    for name, ds in g.items():
        if name != ROUND and not ds.dims[0]:
            ds.dims[0].attach_scale(scale)


def bundle(index: str, target: str) -> list[str]:
    """Copy a run's results.h5 with every linked part file into one self-contained
    HDF5 file at ``target`` (to send to a colleague: generic tools do not follow
    external links). Written atomically; returns what was left out, one line per role
    whose part file is missing or damaged (their role keys are stored in the
    ``missing_parts`` attribute). ValueError when ``index`` is not a results file."""
    check_destination(target, folder=False)
    refuse_existing([target], "it may be the run's own results.h5, another run's, or a bundle already sent")
    missing, left_out = [], []
    with (
        open_results(index) as src,
        made_folder(os.path.dirname(target) or os.curdir),  # gone again when the bundle fails
        _reading_the_run(),
        new_hdf5(target) as dst,
    ):
        dst.attrs.update(src.attrs)
        dst.attrs[BUNDLED] = os.path.abspath(index)
        for key, part in (yaml.safe_load(src.attrs.get("roles", "{}")) or {}).items():
            try:  # checked first: copying would carry damage into the bundle
                dst.copy(open_role(src, key), key)  # the external link resolves: the part's content is copied
            except PART_ERRORS:
                if key in dst:  # what was copied before the damage
                    del dst[key]
                missing.append(key)
                left_out.append(lost_role(src, key, part))
                continue
            for group in dst[key].values():  # scales point into the part file: attach them anew
                if isinstance(group, h5py.Group) and ROUND in group:
                    for ds in group.values():
                        for name in _SCALE_ATTRS:
                            if name in ds.attrs:
                                del ds.attrs[name]
                    _attach_round_scale(group)
        if RECORDS in src:
            dst.copy(src[RECORDS], RECORDS)  # the history, with each evaluation's metrics
        if METRICS in src:
            dst.copy(src[METRICS], METRICS)  # the newest evaluation's, resolved
        dst.attrs["missing_parts"] = yaml.safe_dump(missing)
    return left_out


@contextlib.contextmanager
def _reading_the_run() -> Iterator[None]:
    """HDF5's errors copying the records and metrics of results.h5 itself: an OSError that
    says so (the file is built in memory: they are not a write's)."""
    try:
        yield
    except RuntimeError as e:
        raise OSError(f"copying the run failed: {e} (a damaged results.h5?)") from e


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
