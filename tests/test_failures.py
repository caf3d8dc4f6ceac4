"""kill -9 of a rank mid-run: every other rank exits non-zero within the bound,
naming the dead rank, and a restart resumes from the last checkpoint set."""

import os
import re
import signal
import subprocess
import time

import h5py
import pytest
from conftest import harness, mpirun, run_mpi, spawn_ranks, tiny_config, wait_for_rounds, write_config

from collafuse_hpc.runtime import checkpoint

pytestmark = pytest.mark.mpi
ROUNDS = 16  # the kill lands at round 4 or 5; the restart trains the rest


@pytest.mark.parametrize(
    "victim,servers,cuts,named,peers",
    [
        (1, 1, [0.2, 0.5], "rank 1 (client 'c0')", [0]),
        (0, 1, [0.2, 0.5], "rank 0 (server 0)", [1, 2]),
        (1, 2, [0.2, 0.4, 0.2, 0.6], "rank 1 (server 1)", [0, 3, 5]),  # its replica and its clients
    ],
    ids=["client", "server", "second-server"],
)
def test_kill_9_without_a_launcher_that_cleans_up(tmp_path, shards, victim, servers, cuts, named, peers):
    """Ranks that talk to the dead one name it; the others name the rank whose exit
    they saw (a cascade); nobody waits for the timeout; a complete checkpoint set is kept.
    The restart after a client's, the server's and a second server's death is the mpirun
    test's below (the same configs; its client victim is the other client)."""
    raw = tiny_config(shards, tmp_path / "out", cuts, rounds=ROUNDS, log_every=1, checkpoint_every=2)
    raw["server"]["count"] = servers
    cfg = write_config(tmp_path / "run.yaml", raw)
    n = servers + len(cuts)
    procs = spawn_ranks(n, ["train", cfg], tmp_path / "logs")
    part = "server_1.h5" if victim == 1 and servers == 2 else ("server_0.h5" if victim == 0 else "client_c0.h5")
    pid = wait_for_rounds(tmp_path / "out/parts" / part, 4)
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    for p in procs:
        p.wait(timeout=90)
    elapsed = time.monotonic() - t0
    codes = [p.returncode for p in procs]
    assert codes[victim] == -signal.SIGKILL
    assert all(c == 1 for r, c in enumerate(codes) if r != victim), codes
    assert elapsed < raw["run"]["timeout_s"], elapsed
    for rank in range(n):
        if rank != victim:
            text = (tmp_path / "logs" / f"rank{rank}.err").read_text()
            (error,) = [line for line in text.splitlines() if line.startswith("collafuse-hpc: error:")]
            assert named in error if rank in peers else re.search(r"rank \d \((server \d|client 'c\d')\)", error), (
                rank,
                error,
            )
    print(f"\nkill -9 {named}: all {n - 1} other ranks exited non-zero {elapsed:.2f} s later")
    assert checkpoint.complete_rounds(str(tmp_path / "out")), "no complete checkpoint set to restart from"


@pytest.mark.parametrize(
    "servers,cuts,part",
    [(1, [0.2, 0.5], "client_c1.h5"), (1, [0.2, 0.5], "server_0.h5"), (2, [0.2, 0.4, 0.2, 0.6], "server_1.h5")],
    ids=["client", "server", "second-server"],
)
def test_kill_9_under_mpirun_ends_the_job_and_a_restart_resumes(tmp_path, shards, servers, cuts, part):
    raw = tiny_config(shards, tmp_path / "out", cuts, rounds=ROUNDS, log_every=1, checkpoint_every=2)
    raw["server"]["count"] = servers
    cfg = write_config(tmp_path / "run.yaml", raw)
    mpirun()
    proc = harness.start_mpi(
        servers + len(cuts), ["train", cfg], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    os.kill(wait_for_rounds(tmp_path / "out/parts" / part, 4), signal.SIGKILL)
    t0 = time.monotonic()
    proc.communicate(timeout=90)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0 and elapsed < raw["run"]["timeout_s"]
    print(f"\nkill -9 of {part[:-3]} under mpirun: job ended (exit {proc.returncode}) {elapsed:.2f} s later")
    kept = checkpoint.complete_rounds(str(tmp_path / "out"))
    assert kept, "no complete checkpoint set to restart from"
    resumed = run_mpi(servers + len(cuts), ["train", cfg, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from the checkpoint set of round {kept[-1]}" in resumed.stderr
    with h5py.File(tmp_path / "out/results.h5") as f:
        assert list(f["server/rounds/round"][()]) == list(range(ROUNDS))


def test_a_client_killed_while_the_server_samples_for_it_is_seen_within_seconds(tmp_path, shards):
    """The server is computing, not waiting for a message: it sees the dead client by its
    heartbeat, long before the sampling (about 30 s here) would have ended."""
    raw = tiny_config(shards, tmp_path / "out", [0.25, 0.5], rounds=2, samples_per_client=12000)
    cfg = write_config(tmp_path / "run.yaml", raw)
    procs = spawn_ranks(3, ["train", cfg], tmp_path / "logs")
    deadline = time.monotonic() + 90
    while checkpoint.complete_rounds(str(tmp_path / "out")) != [2]:  # training is over: sampling has begun
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(1)
    procs[2].kill()
    t0 = time.monotonic()
    codes = [p.wait(timeout=90) for p in procs]
    elapsed = time.monotonic() - t0
    assert codes == [1, 1, -signal.SIGKILL] and elapsed < 20, (codes, elapsed)
    error = (tmp_path / "logs/rank0.err").read_text()
    assert "rank 2 (client 'c1') stopped its heartbeat" in error, error[-2000:]
    print(f"\nclient killed while the server sampled: every rank ended {elapsed:.1f} s later")
