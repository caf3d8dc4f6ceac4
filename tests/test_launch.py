"""Rank discovery from launcher environments."""

import pytest

from collafuse_hpc.launch import _first_slurm_host, discover, threads_per_rank


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
