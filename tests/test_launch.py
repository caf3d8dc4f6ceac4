"""Rank discovery from launcher environments, and the rendezvous store's socket."""

import os
import socket
import subprocess
import sys

import pytest
from conftest import mpirun, spawn_ranks, tiny_config, wait_for_rounds, write_config
from harness import PACKAGE, free_port, mpi_env

from collafuse_hpc.runtime.launch import _first_slurm_host, discover, threads_per_rank


def test_torchrun_variables_come_first():
    env = {
        "RANK": "2",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": "1234",
        "SLURM_PROCID": "9",
        "SLURM_STEP_ID": "0",
    }
    launch = discover(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.source) == (2, 4, 0, "torchrun")
    assert (launch.master_addr, launch.master_port) == ("n1", 1234)


def test_srun_step_gives_rank_master_host_and_job_port():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "6",
        "SLURM_LOCALID": "1",
        "SLURM_NNODES": "2",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NODELIST": "localhost,gpu2",
    }
    launch = discover(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.local_world_size) == (5, 6, 1, 3)
    assert launch.master_addr == "localhost" and launch.master_port == 20000 + 123456 % 20000
    assert launch.source == "slurm"


def test_unresolvable_slurm_host_falls_back_to_loopback():
    env = {
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "1",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NODELIST": "fakenode[1-2]",
    }
    assert discover(env).master_addr == "127.0.0.1"


@pytest.mark.parametrize(
    "nodelist,first",
    [("gpu[003-005,007],cpu1", "gpu003"), ("node7", "node7"), ("a-b[10-12]", "a-b10"), ("x1,x2", "x1")],
)
def test_first_host_of_a_slurm_node_list(nodelist, first):
    assert _first_slurm_host(nodelist) == first


def test_no_launcher_is_a_single_process_and_threads_split_the_cores():
    launch = discover({})
    assert (launch.rank, launch.world_size, launch.source) == (0, 1, "single")
    assert threads_per_rank(launch, 3) == 3 and threads_per_rank(launch, 0) >= 1


def _listening(port: int) -> set[str]:
    """IPv4/IPv6 addresses listening on ``port`` (from /proc/net/tcp*, state 0A)."""
    found = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, p = local.split(":")
                if state == "0A" and int(p, 16) == port:
                    found.add(addr)
    return found


@pytest.mark.slow
def test_the_rendezvous_store_listens_on_master_addr_only(tmp_path, shards):
    cfg = write_config(tmp_path / "run.yaml", tiny_config(shards, tmp_path / "out", [0.2, 0.5], rounds=400))
    procs = spawn_ranks(3, ["train", cfg], tmp_path / "logs")  # MASTER_ADDR=127.0.0.1
    try:
        wait_for_rounds(tmp_path / "out/parts/server_0.h5", 1)  # the store is up
        environ = dict(v.split("=", 1) for v in open(f"/proc/{procs[0].pid}/environ").read().split("\0") if "=" in v)
        assert _listening(int(environ["MASTER_PORT"])) == {"0100007F"}  # 127.0.0.1, not 0.0.0.0 or ::
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.mark.slow
def test_a_master_port_in_use_is_named(tmp_path, shards):
    cfg = write_config(tmp_path / "run.yaml", tiny_config(shards, tmp_path / "out", [0.2, 0.5], timeout_s=3))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = {**os.environ, "RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1"}
        env["MASTER_PORT"] = str(busy.getsockname()[1])
        done = subprocess.run(
            [sys.executable, "-m", "collafuse_hpc", "train", cfg], env=env, capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 2, done.stderr
    assert f"port {env['MASTER_PORT']} is in use (another job?): set MASTER_PORT" in done.stderr


@pytest.mark.mpi
def test_under_mpi_rank_0s_master_address_holds_for_every_rank(tmp_path, shards):
    """mpirun passes MASTER_ADDR/MASTER_PORT to the ranks of other nodes only with -x: here
    only rank 0 has them (an MPMD line), and every rank uses rank 0's address and port."""
    cfg = write_config(tmp_path / "run.yaml", tiny_config(shards, tmp_path / "out", [0.2, 0.5], rounds=2))
    train = [*PACKAGE, "train", cfg]
    port = free_port()
    rank_0 = ["-np", "1", "env", "MASTER_ADDR=127.0.0.1", f"MASTER_PORT={port}", *train]
    line = [mpirun(), *rank_0, ":", "-np", "2", *train]
    env = {k: v for k, v in mpi_env().items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run(line, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"launch: mpi, 3 ranks (1 servers, 2 clients), master 127.0.0.1:{port}" in done.stderr
