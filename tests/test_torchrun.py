"""The real torchrun binary (it ships with torch): its agent serves the rendezvous
store, restarts failed workers with --max-restarts, and stops them with SIGTERM."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import tiny_config, until, wait_for_rounds, write_config
from harness import free_port

from collafuse_hpc.runtime import checkpoint

pytestmark = pytest.mark.mpi

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def torchrun_env() -> dict[str, str]:
    """The environment as a user's shell has it, plus a free port for the agent's store
    (PET_MASTER_PORT is torchrun's --master-port, so the command line stays as written)."""
    return {**os.environ, "PET_MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}


def start_torchrun(config: str, cwd: Path, options: tuple[str, ...] = ()) -> subprocess.Popen:
    """``torchrun --nproc-per-node=3 [options] -m collafuse_hpc train CONFIG``, as docs/getting-started.md has it."""
    return subprocess.Popen(
        [TORCHRUN, "--nproc-per-node=3", *options, "-m", "collafuse_hpc", "train", config],
        cwd=cwd,
        env=torchrun_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _workers(proc: subprocess.Popen) -> list[int]:
    """Pids of the agent's workers (its children)."""
    out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def _kill(proc: subprocess.Popen) -> None:
    """After a failed assertion: end the workers, then the agent."""
    for pid in _workers(proc):
        os.kill(pid, signal.SIGKILL)
    proc.kill()
    proc.communicate()


def _sigterm_to_the_agent(proc: subprocess.Popen) -> str:
    """SIGTERM to torchrun (as scancel or a user's kill): every worker must be gone within
    10 s, not after the agent's 30 s grace. Returns the agent's stderr."""
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    until(lambda: not _workers(proc), timeout=10, what="every worker ending after the agent's SIGTERM")
    assert time.monotonic() - sent < 10
    return proc.communicate(timeout=30)[1]


def _rounds_and_samples(out: Path) -> dict[str, np.ndarray]:
    found = {}
    with h5py.File(out / "results.h5") as f:
        for key in ("server", "clients/c0", "clients/c1"):
            for name in ("round", "loss_local", "loss_server"):
                if name in f[f"{key}/rounds"]:
                    found[f"{key}/{name}"] = f[f"{key}/rounds/{name}"][()]
        for cid in ("c0", "c1"):
            found[f"{cid}/samples"] = f[f"clients/{cid}/samples/images"][()]
    return found


def test_a_restarted_worker_resumes_and_the_run_equals_an_uninterrupted_one(tmp_path, shards):
    """A client rank raises at round 3 in the first attempt; --max-restarts 1 restarts
    every worker, which continue from the set of round 2 and finish all rounds. The
    uninterrupted run uses the c10d rendezvous (docs/slurm.md's multi-node line)."""
    raw = tiny_config(shards, tmp_path / "crashed", [0.2, 0.4], rounds=6, checkpoint_every=2)
    raw["fault"] = {"rank": 2, "round": 3, "attempt": 0}
    proc = start_torchrun(write_config(tmp_path / "crash.yaml", raw), tmp_path, ("--max-restarts", "1"))
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert "injected fault at round 3" in err
    assert "torchrun restart 1: continuing from the newest complete checkpoint set" in err
    assert "resuming from the checkpoint set of round 2" in err

    raw["fault"] = {}
    raw["run"]["output_dir"] = str(tmp_path / "whole")
    c10d = ("--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}")  # as docs/slurm.md's srun torchrun line
    proc = start_torchrun(write_config(tmp_path / "whole.yaml", raw), tmp_path, c10d)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    crashed, whole = _rounds_and_samples(tmp_path / "crashed"), _rounds_and_samples(tmp_path / "whole")
    assert list(crashed["server/round"]) == list(range(6))
    for key in whole:
        np.testing.assert_allclose(crashed[key], whole[key], rtol=1e-6, equal_nan=True, err_msg=key)


def test_the_agents_sigterm_during_training_stops_every_rank_within_10_s(tmp_path, shards):
    raw = tiny_config(shards, tmp_path / "out", [0.2, 0.4], rounds=2000, checkpoint_every=1000)
    proc = start_torchrun(write_config(tmp_path / "run.yaml", raw), tmp_path)
    try:
        wait_for_rounds(tmp_path / "out/parts/server_0.h5", 2, timeout=120)
        assert len(_workers(proc)) == 3
        err = _sigterm_to_the_agent(proc)
    finally:
        _kill(proc)
    assert "stopped by SIGTERM after round" in err and "checkpoint set written" in err, err[-3000:]
    assert proc.returncode != 0  # the agent reports the stop as a failure of its job


def test_the_agents_sigterm_keeps_the_agreed_set_that_rank_0_writes_slower_than_the_grace(tmp_path, shards):
    """The agent forwards its SIGTERM and gives the workers 30 s: rank 0 takes 8 s (more
    than run.stop_grace_s) to write its file of the agreed set, and the set completes."""
    slow = {"rank": 0, "mode": "slow_write", "delay_s": 8}
    raw = tiny_config(shards, tmp_path / "out", [0.2, 0.4], slow, rounds=2000, log_every=1, checkpoint_every=0)
    proc = start_torchrun(write_config(tmp_path / "run.yaml", raw), tmp_path)
    try:
        wait_for_rounds(tmp_path / "out/parts/server_0.h5", 2, timeout=120)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=60)[1]
    finally:
        _kill(proc)
    assert "stopped by SIGTERM after round" in err and "no progress" not in err, err[-3000:]
    (stopped,) = checkpoint.complete_rounds(str(tmp_path / "out"))
    for rank in range(3):
        checkpoint.load_rank(str(tmp_path / "out"), stopped, rank)


def test_the_agents_sigterm_while_ranks_start_ends_them_at_once(tmp_path, shards):
    """Workers still importing torch or waiting for the rendezvous end within 10 s
    with exit 75, instead of waiting out the agent's 30 s grace."""
    raw = tiny_config(shards, tmp_path / "out", [0.2, 0.4], rounds=2000, timeout_s=120)
    proc = start_torchrun(write_config(tmp_path / "run.yaml", raw), tmp_path)
    try:
        until(lambda: len(_workers(proc)) == 3, timeout=30, what="torchrun starting 3 workers")
        time.sleep(0.5)
        err = _sigterm_to_the_agent(proc)
    finally:
        _kill(proc)
    assert "forcefully exiting via 9" not in err, err[-3000:]
    assert "exitcode  : 75" in err or "stopped by SIGTERM" in err, err[-3000:]


def test_a_worker_that_dies_ends_the_job_within_15_s(tmp_path, shards):
    raw = tiny_config(shards, tmp_path / "out", [0.2, 0.4], rounds=2000, checkpoint_every=1000)
    raw["fault"] = {"rank": 1, "round": 5, "mode": "exit"}
    proc = start_torchrun(write_config(tmp_path / "run.yaml", raw), tmp_path)
    try:
        wait_for_rounds(tmp_path / "out/parts/server_0.h5", 4, timeout=120)
        _, err = proc.communicate(timeout=15)
    finally:
        _kill(proc)
    assert proc.returncode != 0
    assert "forcefully exiting via 9" not in err, err[-3000:]


@pytest.mark.parametrize("launcher", ["torchrun", "jobs/local.sh"])
def test_a_refused_start_names_its_cause_last_on_every_rank(tmp_path, shards, launcher):
    """Every rank refuses a start alike, but the launcher stops the slower ranks with SIGTERM
    when the first exits, and they said 'stopped by SIGTERM before training started ... run
    again with --resume=auto', the wrong fix, after the real cause (a folder that holds a
    run; a --resume of another config). A rank that is still checking finishes its checks."""
    config = write_config(tmp_path / "run.yaml", tiny_config(shards, tmp_path / "out", [0.25, 0.5], rounds=2))
    done = subprocess.run(
        [sys.executable, "-m", "collafuse_hpc", "train", config, "--in-process"], capture_output=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    launch = [TORCHRUN, "--nproc-per-node=3", "-m", "collafuse_hpc"] if launcher == "torchrun" else [launcher, "3"]
    for args, cause in (
        ([], "holds results of an earlier run; pass --resume to continue it"),
        (["--resume", "--set", "clients.0.cut_ratio=0.4"], "this config differs from the run in"),
    ):
        done = subprocess.run(
            [*launch, "train", config, *args], cwd=ROOT, env=torchrun_env(), capture_output=True, text=True, timeout=120
        )
        ours = [line for line in done.stderr.splitlines() if line.startswith("collafuse-hpc: ")]
        assert done.returncode != 0 and ours, done.stderr
        assert all(cause in line for line in ours), ours
