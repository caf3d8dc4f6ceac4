"""All-or-nothing file writes: the one place files are replaced.

Every file a reader may open while it is being (re)written (checkpoints,
results.h5, shards, feature caches, the run lock) is written to a temporary
file beside its target and renamed over it, so a reader or a crash sees the
old file or the new one, never half of one. A command that makes a file others are
judged by or read from (a classifier, a converted network, a bundle, exported
grids) never replaces one that exists: :func:`refuse_existing`. A folder written whole
(a report) is written beside its target and swapped in: :func:`replace_folder`. A file
that one of several processes starting together may create (the run lock):
:func:`write_new`. A command checks where it will write before its work
(:func:`check_destination`), and an error making or writing an output is a
:class:`WriteError`, which commands report apart from their inputs' read errors. A new
HDF5 file (a shard, a run's index, a bundle) is written by :func:`new_hdf5`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator

import h5py


class WriteError(OSError):
    """A command's output that could not be made or written (``filename`` names it):
    told apart from an input that could not be read, which a command reports otherwise."""


TESTS = ("probe", "access", "none")  # check_destination's ways to find out whether a file can be made


def check_destination(path: str, folder: bool, test: str = "probe") -> None:
    """Raise ValueError when ``path`` (a folder with ``folder``, else a file) could not be
    made: a file or a broken link where it or a folder above it should be, a ``..`` after
    a folder that does not exist, or a nearest existing folder in which this process
    cannot create a file. The path is taken as the system takes it (each ``..`` after
    the link before it), so the path checked is the path written. Called before a
    command's work, so a mistyped --out costs a second, not the training or decoding
    before the first write; errors of the write itself (a full disk) still come when
    they happen, as WriteError.

    Args:
        test: how to find out whether a file can be created there: "probe" makes and
            removes one (permission bits say yes to root; a folder that keeps it is
            refused too); "access" asks ``os.access``, which writes nothing (a dry run)
            and sees a read-only mount but not every refusal; "none" checks the path
            alone (a cache that may be read-only and full).
    """
    if test not in TESTS:
        raise ValueError(f"test must be one of {TESTS}, got {test!r}")
    names_folder = path.endswith((os.sep, os.altsep or os.sep)) or os.path.basename(path) in (os.curdir, os.pardir)
    if not folder and names_folder:
        raise ValueError(f"cannot write {path!r}: it names a folder; give a file name")
    path = path.rstrip(os.sep) or (os.sep if path else os.curdir)  # "afile/" is afile to the walk; "" is "."
    above = path if folder else os.path.dirname(path)
    while not os.path.lexists(above or "."):
        if os.path.basename(above) == os.pardir:
            through = os.path.dirname(above)
            what = "missing"
            if os.path.lexists(through):
                what = f"a link to {os.readlink(through)!r}, which is missing" if os.path.islink(through) else "a file"
            raise ValueError(f"cannot write {path!r}: it goes through {through!r}, {what}")
        above = os.path.dirname(above)  # "" ends the walk: it is "." to lexists
    above = above or "."
    if not os.path.exists(above):
        raise ValueError(f"cannot write {path!r}: {above!r} is a link to {os.readlink(above)!r}, which is missing")
    if not os.path.isdir(above):
        if folder and above == path:
            raise ValueError(f"cannot write into {path!r}: it is a file, not a folder; give a folder")
        raise ValueError(f"cannot write {path!r}: {above!r} is a file, not a folder")
    refused = f"cannot write {path!r}: cannot create a file in {above!r}"
    if test == "access" and not os.access(above, os.W_OK | os.X_OK):
        raise ValueError(f"{refused} (no permission, or a read-only file system)")
    if test != "probe":
        return
    try:
        fd, made = tempfile.mkstemp(prefix=".write-check-", dir=above)
    except OSError as e:
        raise ValueError(f"{refused} ({e.strerror})") from None
    os.close(fd)
    try:
        os.unlink(made)
    except OSError as e:  # an append-only folder: the rename of a finished write would fail too
        raise ValueError(f"cannot write {path!r}: a file made in {above!r} cannot be removed ({e.strerror})") from None


def write_error(e: Exception, path: str) -> WriteError:
    """``e``, raised while writing ``path``, as a WriteError naming ``path``. HDF5 gives
    the system's errno in its text only; numpy's short write gives none."""
    code = getattr(e, "errno", None)
    if code is None and (found := re.search(r"errno = (\d+)", str(e))):
        code = int(found.group(1))
    if code is None and " written" in str(e):  # numpy: "8192 requested and 8064 written"
        return WriteError(None, f"{e}: only part was written (a full disk, or a quota reached)", path)
    return WriteError(code, os.strerror(code) if code else str(e).split(" (")[0], path)


@contextlib.contextmanager
def _as_write_error(name: str | None = None) -> Iterator[None]:
    """Re-raise an OSError of the block (making a folder, a rename) as a WriteError naming
    ``name`` (the file the user asked for, not its temporary), else the error's file."""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(e.errno, e.strerror or str(e), name or e.filename) from e


@contextlib.contextmanager
def atomic_path(path: str, durable: bool = False) -> Iterator[str]:
    """Yield a temporary path to write ``path``'s new content to; rename it over
    ``path`` when the block ends, or remove it when the block raises.

    Args:
        durable: fsync the file and its folder, so the rename survives a power loss
            (checkpoints: the newest complete set must really be on disk).
    """
    folder = os.path.dirname(path) or os.curdir  # as given: the system takes link/../x through the link
    with _as_write_error():  # the folder stays: several ranks write a checkpoint set into one
        os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"  # whose it is: see dead_temporary
    try:
        yield tmp
        with _as_write_error(path):
            if durable:
                _fsync(tmp)
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        with _as_write_error():
            _fsync(folder)


def dead_temporary(name: str) -> bool:
    """Whether ``name`` is the temporary file of an :func:`atomic_path` write whose process
    is gone (killed mid-write: nothing will rename or remove it). A process of another
    host (a shared file system) is never judged dead."""
    found = re.search(r"\.tmp-(.+)-(\d+)$", name)
    return found is not None and not process_alive(found.group(1), int(found.group(2)))


def process_alive(host: str, pid: int) -> bool:
    """Whether process ``pid`` of ``host`` may still run: only one of this host can be known gone."""
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process; no such pid
        return False
    except PermissionError:  # another user's
        return True
    return True


def free_space(path: str) -> int:
    """Bytes free on the file system where ``path`` is, or would be made."""
    folder = os.path.abspath(path)
    while not os.path.isdir(folder):  # a folder still to be made: its nearest existing one
        folder = os.path.dirname(folder)
    return shutil.disk_usage(folder).free


@contextlib.contextmanager
def new_hdf5(path: str) -> Iterator[h5py.File]:
    """Yield a new HDF5 file, built in memory, that replaces ``path`` when the block ends
    (:func:`atomic_path`). It is written by Python, not by HDF5: HDF5 writing a file that
    meets a full disk or a file size limit raised from its flush, its close or its
    objects' destructors, and closing such a file crashed the process (SIGSEGV); a failed
    write here is a WriteError naming ``path``. Memory: the file's size, once more while
    it is written."""
    f = h5py.File(f"{path}.in-memory", "w", driver="core", backing_store=False)  # the name is not opened
    try:
        yield f
        f.flush()
        image = f.id.get_file_image()
    finally:
        f.close()
    with atomic_path(path) as tmp, _as_write_error(path), open(tmp, "wb") as out:
        out.write(image)


def write_new(path: str, text: str) -> bool:
    """Write ``text`` to ``path`` whole, only if nothing is at ``path``; False if something
    is. Of processes writing one path at once exactly one gets True: the file is written
    under a name of its own beside ``path`` and hard-linked into place, which never
    replaces and is never seen half-written. Where the file system has no hard links it
    is created exclusively (O_EXCL) and written in place: still exclusive, but a reader
    may see it half-written for an instant."""
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        try:
            os.link(tmp, path)
        except FileExistsError:  # on NFS a retransmitted link that was made answers EEXIST too
            return os.stat(tmp).st_nlink > 1
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):  # no hard links
                raise
            try:
                made = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(made, "w") as f:
                f.write(text)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def made_folder(path: str) -> Iterator[None]:
    """Make the folder ``path`` with its missing parents; on leaving, remove those this
    call made that are empty again, deepest first: a refused, failed or interrupted
    command leaves no folder behind, a command that wrote into it keeps it."""
    made, above = [], path.rstrip(os.sep)
    while above and not os.path.isdir(above):  # the path as given, as makedirs takes it
        if os.path.basename(above) not in (os.curdir, os.pardir):  # "a/./b" makes a and a/b, not a/.
            made.append(above)
        above = os.path.dirname(above)
    try:
        with _as_write_error():  # a failure part-way leaves the folders made before it: removed below
            os.makedirs(path, exist_ok=True)
        yield
    finally:
        for folder in made:
            try:
                os.rmdir(folder)
            except OSError:  # something was written into it (or by another process)
                break


def replace_folder(staging: str, path: str, aside: str) -> None:
    """Put the folder ``staging`` at ``path`` by two renames, the earlier folder at
    ``path`` going to ``aside`` for the caller to remove (removing a large folder takes a
    while and is not part of the swap): a reader sees the earlier folder whole, then none
    for an instant, then the new one whole, never a mix. An exception between the
    renames (Ctrl-C, a failed rename) puts the earlier one back; once ``staging`` is gone
    the swap is done. All three paths must be on one file system."""
    try:
        with contextlib.suppress(FileNotFoundError):
            os.rename(path, aside)
        os.rename(staging, path)
    except BaseException:
        if os.path.exists(aside) and not os.path.exists(path):
            os.rename(aside, path)
        raise


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def refuse_existing(paths: Iterable[str], why: str) -> None:
    """Raise ValueError naming every one of ``paths`` that exists, before anything is
    written: what was made from the old file (evaluations scored with a classifier,
    a bundle sent to a colleague) would silently stop matching its new content.

    Args:
        why: what replacing it would break, for the message.
    """
    taken = [p for p in paths if os.path.lexists(p)]
    if taken:
        names, one = ", ".join(repr(p) for p in taken), len(taken) == 1
        verb, it = ("exists", "it") if one else ("exist", "them")
        raise ValueError(f"{names} {verb}: {why}; write elsewhere, or remove {it} first")
