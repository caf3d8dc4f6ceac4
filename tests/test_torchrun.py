"""The real torchrun binary (it ships with torch): its agent serves the rendezvous
store, restarts failed workers with --max-restarts, and stops them with SIGTERM."""

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch.distributed as dist
from conftest import tiny_config, until, wait_for_rounds, write_config
from harness import free_port

from collafuse_hpc.cli import main
from collafuse_hpc.runtime import checkpoint
from collafuse_hpc.runtime.dist_wire import Attempt, join
from collafuse_hpc.runtime.launch import discover

pytestmark = pytest.mark.mpi

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def torchrun_env() -> dict[str, str]:
    """The environment as a user's shell has it, plus a free port for the agent's store
    (PET_MASTER_PORT is torchrun's --master-port, so the command line stays as written)."""
    return {**os.environ, "PET_MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}


def start_torchrun(
    config: str, cwd: Path, options: tuple[str, ...] = (), command: tuple[str, ...] = ("train",)
) -> subprocess.Popen:
    """``torchrun --nproc-per-node=3 [options] -m collafuse_hpc train CONFIG``, as
    docs/getting-started.md has it; ``command``: the words in place of ``train`` (before
    CONFIG, a run's folder for ``sample``; after it, as ``train CONFIG --resume``)."""
    words = [*command[:1], config, *command[1:]]
    return subprocess.Popen(
        [TORCHRUN, "--nproc-per-node=3", *options, "-m", "collafuse_hpc", *words],
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
    assert main(["train", config, "--in-process"]) == 0  # the run the starts below refuse to write over
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


def _node_agent(config: str, cwd: Path, endpoint: str, addr: str, err, options: tuple[str, ...]) -> subprocess.Popen:
    """One node's agent of a two-node job (``--nnodes=2``, 2 workers each, c10d rendezvous,
    ``--max-restarts=1``) as docs/slurm.md's srun torchrun line starts it; its stderr (and
    its workers') goes to ``err``. The agent at 127.0.0.1 hosts the rendezvous and, its
    address sorting first, is node 0: it runs ranks 0 and 1 and serves the workers' store."""
    return subprocess.Popen(
        [
            TORCHRUN,
            "--nnodes=2",
            "--nproc-per-node=2",
            "--max-restarts=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}",
            "--rdzv-id=two-nodes",
            f"--rdzv-conf=is_host={str(addr == '127.0.0.1').lower()}",
            f"--local-addr={addr}",
            "-m",
            "collafuse_hpc",
            "train",
            config,
            *options,
        ],
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=err,
    )


@pytest.mark.parametrize("options", [(), ("--resume=auto",)])
def test_two_nodes_agree_on_their_attempt_after_one_restarts_its_workers(tmp_path, shards, options):
    """Each agent counts its own restarts (TORCHELASTIC_RESTART_COUNT), and a restart for
    another node's sake counts none. Node 1's worker dies while node 0's workers are busy
    (held with SIGSTOP, as in a long step): node 1's agent restarts its workers (count 1),
    node 0's agent sees it waiting and restarts its own (count 0). Every rank of that
    attempt must see a restart and use one namespace of the store that node 0 has served
    since the first attempt: they continue from the newest set and finish, none refusing
    the folder or waiting on keys that the others never write."""
    raw = tiny_config(shards, tmp_path / "out", [0.2, 0.4, 0.6], rounds=12, checkpoint_every=2)
    config = write_config(tmp_path / "run.yaml", raw)
    endpoint = f"127.0.0.1:{free_port()}"
    logs = [tmp_path / "node0.err", tmp_path / "node1.err"]
    with open(logs[0], "w") as err0, open(logs[1], "w") as err1:
        node0 = _node_agent(config, tmp_path, endpoint, "127.0.0.1", err0, options)
        time.sleep(1)  # node 0 hosts the rendezvous
        node1 = _node_agent(config, tmp_path, endpoint, "localhost", err1, options)
        try:
            wait_for_rounds(tmp_path / "out/parts/server_0.h5", 3, timeout=180)
            busy = _workers(node0)
            for pid in busy:
                os.kill(pid, signal.SIGSTOP)
            os.kill(_workers(node1)[-1], signal.SIGKILL)
            stopping = "closing signal SIGTERM"  # node 0's agent stops its workers for node 1's sake
            until(lambda: stopping in logs[0].read_text(), timeout=90, what="node 0's agent restarting for node 1")
            for pid in busy:
                os.kill(pid, signal.SIGKILL)
            assert node0.wait(timeout=240) == 0 and node1.wait(timeout=60) == 0, logs[0].read_text()[-4000:]
        finally:
            _kill(node0)
            _kill(node1)
    err = logs[0].read_text() + logs[1].read_text()
    assert "collafuse-hpc: error" not in err, err[-4000:]  # no rank refused the folder or waited on stale keys
    assert "resuming from the checkpoint set of round" in err, err[-4000:]
    with h5py.File(tmp_path / "out/results.h5") as f:
        assert list(f["server/rounds/round"][()]) == list(range(12))


def _join_all(port: int, counts: list[int], agent_store: bool, order: list[int]) -> list[Attempt]:
    """``join`` on one thread per rank, started in ``order`` 0.2 s apart, as the workers of
    one attempt whose agents counted ``counts`` restarts (TORCHELASTIC_RESTART_COUNT)."""
    found: dict[int, Attempt] = {}

    def rank(r: int) -> None:
        env = {"RANK": str(r), "WORLD_SIZE": str(len(counts)), "MASTER_PORT": str(port)}
        env |= {"TORCHELASTIC_USE_AGENT_STORE": str(agent_store), "TORCHELASTIC_RESTART_COUNT": str(counts[r])}
        found[r] = join(discover(env), timeout_s=20)

    threads = [threading.Thread(target=rank, args=(r,)) for r in order]
    for t in threads:
        t.start()
        time.sleep(0.2)
    for t in threads:
        t.join(timeout=30)
    return [found[r] for r in range(len(counts))]


def test_ranks_agree_on_the_attempt_whatever_their_agents_counted():
    """The ranks of one attempt derive one attempt from the store, not from their own
    agent's count: a later attempt's namespace holds none of an earlier one's keys, though
    its ranks start before or after rank 0 and find the earlier attempt's tokens there."""
    port = free_port()
    agents_store = dist.TCPStore("127.0.0.1", port, 3, True, timedelta(seconds=20), wait_for_workers=False)
    first = _join_all(port, [0, 0, 0], True, [0, 1, 2])
    assert first == [Attempt(0, first[0].prefix)] * 3
    dist.PrefixStore(first[0].prefix, agents_store).set("written", "by the first attempt")
    prefixes = {first[0].prefix}
    # node 1 restarted (its agent counts 1, node 0's none), its ranks starting before, around, after rank 0
    for restarts, counts, order in ((1, [0, 0, 1], [2, 0, 1]), (2, [0, 0, 1], [1, 2, 0]), (3, [1, 1, 1], [0, 2, 1])):
        again = _join_all(port, counts, True, order)
        assert again == [Attempt(restarts, again[0].prefix)] * 3 and again[0].prefix not in prefixes, again
        assert not dist.PrefixStore(again[0].prefix, agents_store).check(["written"])
        prefixes.add(again[0].prefix)
    own = _join_all(free_port(), [0, 1, 0], False, [1, 0, 2])  # rank 0 serves a store new in each attempt
    assert own == [Attempt(1, own[0].prefix)] * 3
    alone = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": "True"}
    with pytest.raises(RuntimeError, match=r"did not all join .* rank\(s\) \[1\] did not join"):
        join(discover(alone), timeout_s=1)
