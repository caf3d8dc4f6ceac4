"""Checkpoint sets: one file per rank per round, complete only when all are there.

A server's file holds its state; a client rank's file holds the states of the
clients it hosts, by client id, and a client's state does not depend on where
it ran: :func:`load_clients` finds each client in whichever file of the set
holds it, so a run may resume with another ``run.clients_per_rank``.

Layout: ``<output_dir>/checkpoints/round_<R>/rank<r>.pt`` plus a ``COMPLETE``
marker that rank 0 writes after every rank has saved (a barrier), so a resume
never mixes rounds. R is the number of finished rounds (the round to resume
at). Files are written atomically (temp file, fsync, rename) and loaded with
``weights_only=True``.
"""

from __future__ import annotations

import errno
import io
import os
import re
import resource
import shutil

import torch
import yaml

from collafuse_hpc.atomic import WriteError, atomic_path, free_space, write_error
from collafuse_hpc.config import Config, to_dict, with_defaults
from collafuse_hpc.config_rules import resume_differences
from collafuse_hpc.data import inspect_shard

# v2: a client's state holds its audit totals ("released"); v3: members (trainable.py), clients by id
FORMAT = "collafuse-checkpoint-v3"
OLDER = {
    "collafuse-checkpoint-v1": "format v1, without the clients' audit totals",
    "collafuse-checkpoint-v2": "format v2, one client per rank and torch's optimizer state",
}
MARKER = "COMPLETE"


def set_dir(output_dir: str, round_: int) -> str:
    return os.path.join(output_dir, "checkpoints", f"round_{round_:08d}")


def save_atomic(path: str, obj: dict) -> None:
    """Write ``obj`` to ``path`` all-or-nothing and durably (see :mod:`..atomic`).

    A failed write leaves nothing behind and raises a WriteError naming ``path``. torch's
    zip writer reports a failed write as a RuntimeError without its cause, so a full disk
    (ENOSPC) and a file size limit (EFBIG, ``ulimit -f``) are told by the bytes needed."""
    try:
        with atomic_path(path, durable=True) as tmp:
            torch.save(obj, tmp)
    except (OSError, RuntimeError) as e:
        code, need, free = getattr(e, "errno", None), _serialized_size(obj), free_space(path)
        if code == errno.ENOSPC or free < need:
            text = f"{os.strerror(errno.ENOSPC)}: it needs {need} bytes, {free} are free"
            raise WriteError(errno.ENOSPC, text, path) from None
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if code == errno.EFBIG or limit != resource.RLIM_INFINITY and need > limit:
            text = f"{os.strerror(errno.EFBIG)}: it needs {need} bytes, the file size limit (ulimit -f) is {limit}"
            raise WriteError(errno.EFBIG, text, path) from None
        raise write_error(e, path) from e


class _ByteCounter(io.RawIOBase):
    def __init__(self) -> None:
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.count += len(data)
        return len(data)


def _serialized_size(obj: dict) -> int:
    """Bytes that torch.save writes for ``obj`` (counted, not stored)."""
    counter = _ByteCounter()
    torch.save(obj, counter)
    return counter.count


def shard_identities(cfg: Config) -> dict[str, dict[str, str]]:
    """{client id: {"path", "content_hash"}}: which images each client trains on, saved with
    every set so that a resume can tell a moved shard from one that holds other images."""
    return {c.id: {"path": c.shard, "content_hash": inspect_shard(c.shard).content_hash} for c in cfg.clients}


def check_same_images(cfg: Config, saved: dict[str, dict[str, str]], command: str) -> None:
    """Each client's shard must hold the images the run trained on (``saved``: the set's
    :func:`shard_identities`): it may move (data staged elsewhere), but a resume on other
    images trains on them, and an evaluation on them scores against test images that may
    be another split's train images and attacks the wrong training set. ValueError unless
    ``clients.N.allow_new_shard`` says a change is intended."""
    changed = []
    for i, c in enumerate(cfg.clients):
        old = saved.get(c.id)
        new_hash = inspect_shard(c.shard).content_hash
        if old is None or old["content_hash"] == new_hash or c.allow_new_shard:
            continue
        changed.append(
            f"client {c.id!r} trained on {old['path']!r} (content_hash {old['content_hash'][:16]}), but "
            f"clients.{i}.shard {c.shard!r} holds other images (content_hash {new_hash[:16]})"
        )
    if changed:
        raise ValueError(
            f"{command}: {'; '.join(changed)}. Point each shard at the images the run trained on, or, if the "
            "change is intended, pass --set clients.<i>.allow_new_shard=true for each client named"
        )


def trained_round(cfg: Config, command: str) -> int:
    """The round of the newest complete set of ``cfg.run.output_dir``, after checking that
    ``cfg`` is the config that trained it. The one rule for every command that reads a
    trained run (``train --resume``, ``sample``, ``evaluate``): a key outside RESUMABLE that
    differs (a cut, a model, the schedule) would load the weights into another run's
    meaning and report it as this run's. ValueError naming ``command`` otherwise."""
    out = cfg.run.output_dir
    rounds = complete_rounds(out)
    if not rounds:
        raise ValueError(f"{command}: no complete checkpoint set in {out!r} ({describe(out)}); train first")
    saved, errors = None, []
    for r in reversed(rounds):  # the newest set whose config reads (a damaged file falls back, as on restore)
        try:
            saved, shards = saved_run(out, r)
            break
        except ValueError as e:
            errors.append(str(e))
    if saved is None:
        raise ValueError(f"{command}: no checkpoint set in {out!r} can be read: {'; '.join(errors)}")
    differences = resume_differences(with_defaults(saved), to_dict(cfg))
    if differences:
        raise ValueError(
            f"{command}: this config differs from the run in {out!r} in keys that change what it trains: "
            f"{'; '.join(differences)}. Give the run's config (only rounds, logging, checkpointing, timeouts, "
            "devices, shard paths, sampling steps and eval settings may differ), or train this one in a new "
            "run.output_dir"
        )
    check_same_images(cfg, shards, command)
    return rounds[-1]


def save_rank(
    output_dir: str, round_: int, rank: int, state: dict, config_yaml: str, shards: dict[str, dict[str, str]]
) -> None:
    """Save this rank's state for the set of ``round_`` (call on every rank), with the
    config and the clients' :func:`shard_identities`. On a full disk the whole set is
    removed: it can never complete, and its files take space."""
    header = {"format": FORMAT, "round": round_, "rank": rank, "config": config_yaml, "shards": shards}
    try:
        save_atomic(os.path.join(set_dir(output_dir, round_), f"rank{rank}.pt"), {**header, "state": state})
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        shutil.rmtree(set_dir(output_dir, round_), ignore_errors=True)
        raise WriteError(
            errno.ENOSPC,
            f"checkpoint set of round {round_}: cannot write {e.filename!r}: {e.strerror}. Free space (or point "
            "run.output_dir elsewhere), then continue with --resume: the newest complete set is kept",
        ) from None


def mark_complete(output_dir: str, round_: int, keep: int) -> None:
    """Rank 0, after all ranks saved: mark the set complete, drop all but ``keep`` sets."""
    with open(os.path.join(set_dir(output_dir, round_), MARKER), "w") as f:
        f.write(f"{round_}\n")
    for r in complete_rounds(output_dir)[:-keep]:
        shutil.rmtree(set_dir(output_dir, r), ignore_errors=True)


def remove_incomplete(output_dir: str) -> None:
    """Delete set folders without a COMPLETE marker (rank 0, when a run resumes): a crash,
    a kill or a full disk left them half-written, and no resume uses them."""
    for r in _set_rounds(output_dir):
        if not os.path.exists(os.path.join(set_dir(output_dir, r), MARKER)):
            shutil.rmtree(set_dir(output_dir, r), ignore_errors=True)


def _set_rounds(output_dir: str) -> list[int]:
    """Rounds of every set folder, complete or not, ascending."""
    root = os.path.join(output_dir, "checkpoints")
    names = os.listdir(root) if os.path.isdir(root) else []
    return sorted(int(m.group(1)) for m in map(re.compile(r"round_(\d+)").fullmatch, names) if m)


def complete_rounds(output_dir: str) -> list[int]:
    """Rounds with a complete checkpoint set, ascending."""
    return [r for r in _set_rounds(output_dir) if os.path.exists(os.path.join(set_dir(output_dir, r), MARKER))]


def describe(output_dir: str) -> str:
    """What the checkpoints folder holds, for messages about a resume."""
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return f"there is no checkpoints folder {root!r}"
    rounds = _set_rounds(output_dir)
    complete = complete_rounds(output_dir)
    if not rounds:
        return f"{root!r} holds no checkpoint set"
    if not complete:
        return f"{root!r} holds {len(rounds)} set(s), none marked {MARKER} (rounds {rounds[:5]})"
    return f"{root!r} holds complete sets of rounds {complete}"


class CheckpointReadError(OSError):
    """A checkpoint file could not be read for a reason outside the file (an I/O error,
    permissions): the set may be fine, so nothing is skipped or deleted."""


def _torch_load(path: str, mmap: bool) -> object:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _read(path: str, rank: int, mmap: bool) -> dict:
    """The checkpoint at ``path``: ValueError when the file is missing, damaged or not
    this version's (its set cannot be used), CheckpointReadError when reading it failed."""
    try:
        ckpt = _torch_load(path, mmap)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path!r} is missing from a set marked complete") from None
    except IsADirectoryError:
        raise ValueError(f"checkpoint {path!r} is a folder, not a file") from None
    except OSError as e:
        raise CheckpointReadError(
            e.errno,
            f"checkpoint {path!r} could not be read ({e.strerror or e}): an I/O error, not a damaged file, so "
            "no set was skipped and nothing was deleted; run again when the file system answers",
        ) from None
    except Exception as e:  # noqa: BLE001 - truncated or foreign files fail in many ways inside torch
        raise ValueError(f"checkpoint {path!r} is damaged ({type(e).__name__}: {str(e)[:200]})") from None
    _check_format(ckpt, path, rank)
    return ckpt


def saved_run(output_dir: str, round_: int) -> tuple[dict, dict[str, dict[str, str]]]:
    """The resolved config (as a dict) that the set of ``round_`` was written with, and its
    clients' shard identities (empty for sets written before they were saved)."""
    ckpt = _read(os.path.join(set_dir(output_dir, round_), "rank0.pt"), 0, mmap=True)  # tensors stay on disk
    return yaml.safe_load(ckpt["config"]), ckpt.get("shards", {})


def _check_format(ckpt: object, path: str, rank: int) -> None:
    """ValueError unless ``ckpt`` is this version's checkpoint of ``rank``."""
    if isinstance(ckpt, dict) and ckpt.get("format") in OLDER:
        raise ValueError(
            f"checkpoint {path!r} was written by an earlier collafuse-hpc ({OLDER[ckpt['format']]}): "
            "continue or evaluate that run with the version that wrote it, or start a new run"
        )
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or ckpt.get("rank") != rank:
        raise ValueError(f"checkpoint {path!r} is not a {FORMAT} file for rank {rank}")


def load_rank(output_dir: str, round_: int, rank: int, mmap: bool = False) -> dict:
    """This rank's state from the set of ``round_``; ValueError naming the file if it is
    damaged, CheckpointReadError if reading failed. ``mmap``: tensors stay on disk until used."""
    return _read(os.path.join(set_dir(output_dir, round_), f"rank{rank}.pt"), rank, mmap)


def load_clients(output_dir: str, round_: int, ids: list[str]) -> dict[str, dict]:
    """{client id: its state} from the set of ``round_``, whichever rank saved each
    (the placement may have changed since). ValueError naming the file that cannot
    be read, or the clients the set does not hold."""
    names = os.listdir(set_dir(output_dir, round_))
    ranks = sorted(int(m.group(1)) for m in map(re.compile(r"rank(\d+)\.pt").fullmatch, names) if m)
    wanted, found = set(ids), {}
    for rank in ranks:
        held = load_rank(output_dir, round_, rank, mmap=True)["state"].get("clients", {})
        found.update({cid: state for cid, state in held.items() if cid in wanted})
        if len(found) == len(wanted):
            break
    missing = [cid for cid in ids if cid not in found]
    if missing:
        raise ValueError(
            f"the checkpoint set of round {round_} in {output_dir!r} holds no state for client(s) "
            f"{missing[:5]}: the clients changed since it was written"
        )
    return found
