"""Checkpoint sets: one file per rank per round, complete only when all are there.

Layout: ``<output_dir>/checkpoints/round_<R>/rank<r>.pt`` plus a ``COMPLETE``
marker that rank 0 writes after every rank has saved (a barrier), so a resume
never mixes rounds. R is the number of finished rounds (the round to resume
at). Files are written atomically (temp file, fsync, rename) and loaded with
``weights_only=True``.
"""

from __future__ import annotations

import os
import re
import shutil

import torch

FORMAT = "collafuse-checkpoint-v1"
MARKER = "COMPLETE"


def set_dir(output_dir: str, round_: int) -> str:
    return os.path.join(output_dir, "checkpoints", f"round_{round_:08d}")


def save_atomic(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_rank(output_dir: str, round_: int, rank: int, state: dict, config_yaml: str) -> None:
    """Save this rank's state for the set of ``round_`` (call on every rank)."""
    save_atomic(
        os.path.join(set_dir(output_dir, round_), f"rank{rank}.pt"),
        {"format": FORMAT, "round": round_, "rank": rank, "config": config_yaml, "state": state},
    )


def mark_complete(output_dir: str, round_: int, keep: int) -> None:
    """Rank 0, after all ranks saved: mark the set complete, drop all but ``keep`` sets."""
    with open(os.path.join(set_dir(output_dir, round_), MARKER), "w") as f:
        f.write(f"{round_}\n")
    for r in complete_rounds(output_dir)[:-keep]:
        shutil.rmtree(set_dir(output_dir, r), ignore_errors=True)


def complete_rounds(output_dir: str) -> list[int]:
    """Rounds with a complete checkpoint set, ascending."""
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    rounds = []
    for name in os.listdir(root):
        m = re.fullmatch(r"round_(\d+)", name)
        if m and os.path.exists(os.path.join(root, name, MARKER)):
            rounds.append(int(m.group(1)))
    return sorted(rounds)


def load_rank(output_dir: str, round_: int, rank: int) -> dict:
    """This rank's state from the set of ``round_``; ValueError naming the file if unusable."""
    path = os.path.join(set_dir(output_dir, round_), f"rank{rank}.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path!r} is missing from a set marked complete") from None
    except Exception as e:  # truncated or foreign files fail in many ways inside torch
        raise ValueError(f"checkpoint {path!r} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or ckpt.get("rank") != rank:
        raise ValueError(f"checkpoint {path!r} is not a {FORMAT} file for rank {rank}")
    return ckpt
