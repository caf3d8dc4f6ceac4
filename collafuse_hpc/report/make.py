"""``collafuse-hpc report``: tables and figures of a sweep or study from its results files.

    collafuse-hpc report runs/study-*/*/results.h5 --out runs/study-x/report

Writes into --out:
  table.csv     one row per split mode, cut ratio c and client, plus a ``pooled`` row;
                numbers are means over the runs' seeds (``seeds`` counts them) and
                ``<column>_seed_std`` their standard deviation, ``<column>_low``/``_high``
                the 95% interval (one seed: over images; several: the t-interval over
                them, never narrower than the images' noise); column names carry their
                units (see COLUMNS): FID and KID per image set, disclosure of x_c and by
                attack, client compute as exact FLOP ratios and measured time ratios
  table.md      the same as readable tables: quality (copies beside precision and
                recall), disclosure by attack (at one release and at the run's
                releases), membership inference, compute, and with a federated run
                alone, federated and split side by side
  tradeoff.png  quality vs disclosure vs client compute over c, one line per split mode,
                error bars the 95% intervals (needs matplotlib: pip install 'collafuse-hpc[report]';
                skipped with a note otherwise)
  grids/        sample grids per run, client and image set (PNG)
  report.html   all of the above in one self-contained page (images embedded, no network)
The pooled row's FID/KID compare all clients' images with all their real images; its
disclosure and compute columns are means over the clients. Runs at c = 0 and c = 1 do
not depend on the split mode: they are shown under every split mode of the report.
Runs without metrics (not evaluated) are listed and left out, and so are runs whose
metrics are older than the run (trained on after it was evaluated: evaluate it again).
A run is one seed of the point it depends on (split, partition, labels shared, c, seed;
at c = 0 and 1 not the split, at c = 1 not the labels): a second run of a point that only
its labels tell apart (c = 1 made under each split mode of a study) is left out, and two
runs labelled alike are refused: pooled, they would count as two seeds. A seed of c < 1
without the c = 1 run of its partition and seed is left out of versus_c1. What was left
out, and why, is printed and listed in table.md and report.html. The report is written
aside and then replaces --out whole, so nothing of an earlier report stays, and a
refused, failed or interrupted command leaves --out as it was (an interrupt that comes
after the new report is in place says so). Two reports into one
--out at once (a study's points finishing together) take turns: the later one reads the
runs after the earlier one is written, so the report left is the newer one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator

from collafuse_hpc.atomic import check_destination, made_folder, replace_folder
from collafuse_hpc.report import stats
from collafuse_hpc.report.figures import (
    conditions_figure,
    figures_available,
    loss_figure,
    methods_figure,
    tradeoff_figure,
)
from collafuse_hpc.report.tables import aggregate, rows, write_html, write_tables
from collafuse_hpc.results.inspection import evaluate_command, export, summarize
from collafuse_hpc.results.schema import PART_ERRORS


def _point(row: dict) -> tuple:
    """What a run depends on: two runs that share it are one seed of one study point. At
    c = 0 and c = 1 the split mode changes nothing (no hand-over between two chains), and
    at c = 1 neither do shared labels (nothing is sent): "-" stands for those."""
    split = "-" if row["c"] in (0, 1) else row["split"]
    share = "-" if row["c"] == 1 else row["share"]
    return row["method"], split, row["partition"], share, row["c"], row["seed"]


def _point_keys(row: dict) -> tuple:
    """The settings a run was labelled with, whether or not it depends on them."""
    return row["split"], row["share"]


def _run_names(paths: list[str]) -> list[str]:
    """Each run's name in grids/ and the loss figure: its folder's name, or its folder's
    path below the folders' common parent when two runs' folders have the same name."""
    folders = [os.path.dirname(os.path.abspath(p)) for p in paths]
    names = [os.path.basename(f) for f in folders]
    if len(set(names)) == len(names):
        return names
    common = os.path.commonpath(folders)
    return [os.path.relpath(f, common).replace(os.sep, "-") for f in folders]


def _is_report(folder: str) -> bool:
    return any(os.path.exists(os.path.join(folder, name)) for name in ("report.html", "table.csv"))


NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}  # lockf where locks are not served


@contextlib.contextmanager
def _one_writer(out: str, out_arg: str) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` while its report is read and written, so that two
    reports into one folder (a study's points finishing together) take turns instead of
    removing each other's folders, and the later one reads the runs as the earlier left
    them. The lock is a POSIX record lock (fcntl: NFS serves these, not flock on a
    folder) on a hidden ``.<name>.lock`` beside ``out``, removed by its holder, as are
    the folders above ``out`` that this call made when nothing was written into them
    (reports into new folders at once that all write nothing may leave them). Where the
    file system serves no locks (a Lustre mount without ``-o flock``), a line says so
    and the report goes on unlocked. POSIX locks are per process: one call per process
    at a time."""
    folder, name = os.path.split(out)
    path, fd = os.path.join(folder, f".{name}.lock"), None
    held = created = waiting = unlocked = False
    with made_folder(folder):
        try:
            while not held:
                os.makedirs(folder, exist_ok=True)  # a refused report that made it may have removed it meanwhile
                try:
                    try:
                        fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), True
                    except FileExistsError:
                        fd, created = os.open(path, os.O_RDWR), False
                except FileNotFoundError:  # its holder removed it, or a refused report its folder: anew
                    continue
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: another report holds it
                    if not waiting:
                        print(f"report: waiting for another report writing into {out_arg}", flush=True)
                    waiting = True
                    try:
                        fcntl.lockf(fd, fcntl.LOCK_EX)
                    except OSError as e:  # NFS: the file waited on was removed by its holder
                        if e.errno not in (errno.ESTALE, errno.ENOENT):
                            raise
                except OSError as e:
                    if e.errno not in NO_LOCKS:
                        raise
                    said = f"{folder} ({e.strerror}): reports into {out_arg} at once would fail"
                    print(f"report: no file locks in {said}")
                    unlocked = True
                    break
                try:
                    held = os.stat(path).st_ino == os.fstat(fd).st_ino
                except OSError:  # the report before this one removed the file this one waited on: lock the new one
                    pass
                if not held:
                    os.close(fd)
                    fd = None
            yield
        finally:
            if held or (unlocked and created):  # never a file another report may hold
                with contextlib.suppress(OSError):
                    os.unlink(path)  # while still locked: a report waiting on it then sees it gone and locks anew
            if fd is not None:
                os.close(fd)


def _report_folder(out_arg: str) -> str:
    """The folder ``--out`` names, as the system takes the path (each ``..`` after the link
    before it; a link to a folder: that folder, the link kept), for the report, its lock
    and its staging folder; ValueError when a report cannot replace it whole."""
    given = out_arg.rstrip(os.sep)
    if not out_arg:
        raise ValueError("--out is empty; give the report folder's name")
    if os.path.basename(given) in ("", os.curdir, os.pardir):
        raise ValueError(f"--out {out_arg} names a folder by '/', '.' or '..'; give the report folder's own name")
    check_destination(given, folder=False)  # the path above: the lock and the new report are made there
    if os.path.islink(given) and not os.path.exists(given):
        raise ValueError(f"--out {out_arg} is a link to {os.readlink(given)!r}, which is missing")
    out = os.path.realpath(given)
    if os.path.ismount(out):
        raise ValueError(
            f"--out {out_arg} is a mount point, and a report replaces its folder whole; give a folder in it"
        )
    return out


def make_report(results: list[str], out_arg: str, record: int | None = None) -> int:
    """Write the report of the results files ``results`` into the folder ``out_arg``;
    the exit code (0 written, 1 no evaluated run or not written, 2 refused, 130
    interrupted (Ctrl-C; the command turns SIGTERM into one): --out as it was, unless the
    message says the report was written)."""
    try:
        out = _report_folder(out_arg)
    except ValueError as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    try:
        with _one_writer(out, out_arg):
            return _make_report(results, out, out_arg, record)
    except KeyboardInterrupt:
        print(f"report: interrupted; {out_arg} is as it was", file=sys.stderr)
        return 130
    except OSError as e:  # the folder above --out cannot be made, or its lock file written
        print(f"report: error: cannot write into {os.path.dirname(out)}: {e}", file=sys.stderr)
        return 1


def _make_report(results: list[str], out: str, out_arg: str, record: int | None) -> int:
    """make_report, holding the lock on ``out``."""
    if os.path.exists(out) and not (os.path.isdir(out) and (not os.listdir(out) or _is_report(out))):
        print(f"report: error: --out {out_arg} exists and is not a report folder; choose a new one", file=sys.stderr)
        return 2
    evaluated, seen, notes = [], {}, []
    for path in results:  # read and check every file before anything is written
        try:
            s = summarize(path, record)
            if "metrics" not in s:
                print(f"report: {path} has no metrics (not evaluated: {evaluate_command(path)}); left out")
                continue
            if s["stale"] and record is None:  # its row would show an older model under the run's rounds
                notes.append(f"{path} left out: {s['stale']}")
                continue
            lost = [m for m in s["missing"] if ": part file " in m]
            if lost:  # its loss curves, and whether it converged, are in those files
                raise ValueError(f"{path}: missing {'; '.join(lost)}; restore it, or leave the run out")
            try:
                curves = stats.loss_curves(path)
            except (*PART_ERRORS, IndexError, TypeError, ValueError, MemoryError) as e:  # a damaged part:
                # HDF5's errors, or garbage read (a round number of 1e17 asks numpy for that many)
                raise ValueError(f"{path}: a part file is damaged ({e}); restore it, or leave the run out") from None
        except (OSError, ValueError) as e:
            print(f"report: error: {e}", file=sys.stderr)
            return 2
        run = rows(s, curves)
        point = _point(run[0])
        if point in seen and _point_keys(seen[point][1]) != _point_keys(run[0]):  # one run made twice by a sweep
            notes.append(
                f"{path} left out: the same point as {seen[point][0]} (c = {point[4]} depends on neither the split "
                f"mode{' nor shared labels' if point[4] == 1 else ''}), seed {point[5]}: one seed, not two"
            )
            continue
        if point in seen:
            print(
                f"report: error: {seen[point][0]} and {path} are the same point (method, split, partition, labels "
                f"shared, c, seed = {', '.join(map(str, point))}): pooled, one run would count as two seeds; "
                "give each run once (report runs of other settings separately)",
                file=sys.stderr,
            )
            return 2
        seen[point] = path, run[0]
        evaluated.append((path, run, curves))
    for note in notes:
        print(f"report: {note}")
    if not evaluated:
        print("report: no evaluated runs")
        return 1
    staging = None
    try:
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}-", dir=os.path.dirname(out))
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(staging, 0o777 & ~mask)  # a folder like any other the user makes (mkdtemp's is 0700)
        made = write_report(evaluated, staging, record, notes)
        replace_folder(staging, out, staging + ".old")  # replaced whole: no grid or figure of an earlier report stays
        shutil.rmtree(staging + ".old", ignore_errors=True)
    except OSError as e:  # a full disk, a folder made read-only; numpy and PIL may name no cause
        said = f"cannot write the report into {out_arg}: {e.strerror or str(e) or type(e).__name__}"
        print(f"report: error: {said}; {out_arg} is as it was", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if staging is None or os.path.exists(staging):  # not swapped in
            raise
        left = f"; what is left of the earlier one is in {staging}.old" if os.path.exists(staging + ".old") else ""
        print(f"report: interrupted after {out_arg} was written{left}", file=sys.stderr)
        return 130
    finally:
        if staging:  # gone once swapped in
            shutil.rmtree(staging, ignore_errors=True)
    if not figures_available():  # the figures need an optional extra
        print("report: matplotlib is not installed, no figures (pip install 'collafuse-hpc[report]')")
    files = ["table.csv", "versus_c1.csv", "table.md", *made, "grids/", "report.html"]
    print(f"report: {out_arg.rstrip('/')}/" + ", ".join(files))
    return 0


def write_report(
    evaluated: list[tuple[str, list[dict], dict]], out: str, record: int | None, notes: list[str]
) -> list[str]:
    """Every file of the report for ``[(results path, its rows, its loss curves)]`` into
    the folder ``out``, with ``notes`` on the runs left out; returns the figures drawn, for
    the summary line."""
    table, curves = [], {}
    for (path, run, run_curves), name in zip(evaluated, _run_names([e[0] for e in evaluated]), strict=True):
        table += run
        curves[name] = run_curves
        export(path, os.path.join(out, "grids", name), record=record)  # its parts were all read above
    versus = stats.versus_baseline(table)
    unpaired = stats.unpaired_seeds(table)
    for note in unpaired:
        print(f"report: {note}")
    notes = [*notes, *unpaired]
    why_empty = "" if versus else stats.no_comparison(table)  # from the runs: the reason is in their seeds
    table = aggregate(table)
    print(write_tables(table, versus, out, notes, why_empty))
    split = [r for r in table if r["method"] == "split"]  # the figures over c
    pooled = [r for r in split if r["who"] == "pooled"]
    federated = [r for r in table if r["method"] != "split" and r["who"] == "pooled"]  # one point each
    figures = [
        ("Class fidelity and quality per condition, against disclosure and client compute", "conditions.png",
         lambda path: conditions_figure(split, path)),
        ("Trade-off over the cut ratio c", "tradeoff.png", lambda path: tradeoff_figure(pooled, path, federated)),
        ("Alone, federated and split: quality against what a client paid", "methods.png",
         lambda path: methods_figure(table, path)),
    ]  # fmt: skip
    drawn = [(title, os.path.join(out, name)) for title, name, draw in figures if draw(os.path.join(out, name))]
    if pooled and figures_available() and all(math.isnan(r["fidelity"]) for r in pooled):
        instead = "; methods.png shows the pooled FD in its place" if federated else ""
        print(
            "report: conditions.png not drawn: no run was scored for class fidelity (eval.classifier: "
            f"docs/evaluation.md){instead}"
        )
    if loss_figure(curves, os.path.join(out, "loss.png")):
        drawn.append(("Training loss of every run", os.path.join(out, "loss.png")))
    write_html(table, versus, out, drawn, notes, why_empty)
    return [os.path.basename(path) for _, path in drawn]
