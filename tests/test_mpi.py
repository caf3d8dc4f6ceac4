"""Multi-rank runs under mpirun, and under torchrun-style environment variables."""

import time

import h5py
import numpy as np
import pytest
import torch
from conftest import run_mpi, spawn_ranks, tiny_config, write_config

from collafuse_hpc.config import from_dict
from collafuse_hpc.runtime.checkpoint import load_rank
from collafuse_hpc.runtime.run import run_in_process

pytestmark = pytest.mark.mpi


def _check_results(out, client_ids, rounds, batch=6):
    with h5py.File(out / "results.h5") as f:
        assert f.attrs["schema"] == "collafuse-results" and "clients:" in f.attrs["config"]
        assert len(f["server/rounds/round"]) == rounds
        for cid in client_ids:
            g = f[f"clients/{cid}"]
            assert len(g["rounds/loss_local"]) == rounds
            assert g["samples/images"].shape == (4, 1, 8, 8)
            sent = g["audit"].attrs["images_sent"]
            assert sent == (0 if g.attrs["t_c"] == 20 else rounds * batch)
        return {
            key: {n: f[key]["rounds"][n][()] for n in f[key]["rounds"]}
            for key in ["server"] + [f"clients/{c}" for c in client_ids]
        }


@pytest.mark.smoke  # the fast tier's multi-rank test
def test_three_ranks_train_sample_and_write_results(tmp_path, shards):
    cfg = write_config(tmp_path / "run.yaml", tiny_config(shards, tmp_path / "out", [0.2, 0.4]))
    proc = run_mpi(3, ["train", cfg])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "launch: mpi, 3 ranks" in proc.stderr
    _check_results(tmp_path / "out", ["c0", "c1"], rounds=4)
    assert (tmp_path / "out/samples/c0.png").stat().st_size > 0


def test_five_ranks_with_different_cuts_including_local_only(tmp_path, shards):
    cfg = write_config(tmp_path / "run.yaml", tiny_config(shards, tmp_path / "out", [0.1, 0.3, 0.6, 1.0]))
    proc = run_mpi(5, ["train", cfg])
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_results(tmp_path / "out", ["c0", "c1", "c2", "c3"], rounds=4)


def test_distributed_run_equals_in_process_run(tmp_path, shards):
    """Same seeds, same losses and samples: the wire protocol changes nothing."""
    raw = tiny_config(shards, tmp_path / "dist", [0.25, 0.5])
    raw["clients"][0].update(labels=True, share_labels=True)  # labels cross the wire too
    proc = run_mpi(3, ["train", write_config(tmp_path / "run.yaml", raw)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw["run"]["output_dir"] = str(tmp_path / "local")
    run_in_process(from_dict(raw), resume=False)
    dist = _check_results(tmp_path / "dist", ["c0", "c1"], rounds=4)
    local = _check_results(tmp_path / "local", ["c0", "c1"], rounds=4)
    for key in dist:
        for name in ("loss_local", "loss_server"):
            if name in dist[key]:
                np.testing.assert_allclose(dist[key][name], local[key][name], rtol=1e-5, equal_nan=True)
    with h5py.File(tmp_path / "dist/results.h5") as a, h5py.File(tmp_path / "local/results.h5") as b:
        for cid in ("c0", "c1"):
            diff = np.abs(a[f"clients/{cid}/samples/images"][()].astype(int) - b[f"clients/{cid}/samples/images"][()])
            assert diff.max() <= 1


@pytest.mark.parametrize("rank,name", [(1, "client 'c0'"), (0, "server 0")])
def test_a_raising_rank_ends_the_job_with_its_name(tmp_path, shards, rank, name):
    raw = tiny_config(shards, tmp_path / "out", [0.2, 0.2], rounds=50, fault={"rank": rank, "round": 2})
    t0 = time.monotonic()
    proc = run_mpi(3, ["train", write_config(tmp_path / "run.yaml", raw)], timeout=120)
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 60
    assert f"rank {rank} ({name}): RuntimeError: injected fault at round 2" in proc.stderr
    with h5py.File(tmp_path / "out/results.h5") as f:  # what was written stays readable
        assert list(f["server/rounds/round"][()]) == [0, 1]


def test_without_a_launcher_that_kills_peers_survivors_exit_and_name_the_dead_rank(tmp_path, shards):
    """torchrun-style ranks: client c0 dies without a word at round 2; the server
    notices the lost connection, tells c1, and every rank exits non-zero promptly."""
    raw = tiny_config(shards, tmp_path / "out", [0.2, 0.2], rounds=50, fault={"rank": 1, "round": 2, "mode": "exit"})
    cfg = write_config(tmp_path / "run.yaml", raw)
    procs = spawn_ranks(3, ["train", cfg])
    t0 = time.monotonic()
    outputs = [p.communicate(timeout=90) for p in procs]
    elapsed = time.monotonic() - t0
    codes = [p.returncode for p in procs]
    assert codes[1] == 13 and codes[0] != 0 and codes[2] != 0, (codes, outputs)
    assert elapsed < 60
    assert "rank 1 (client 'c0')" in outputs[0][1]
    assert "rank 1 (client 'c0')" in outputs[2][1] or "rank 0 (server 0)" in outputs[2][1]


def test_two_server_ranks_under_mpirun_match_one_server_in_process(tmp_path, shards):
    raw = tiny_config(shards, tmp_path / "two", [0.2, 0.4, 0.2, 0.6], rounds=3, checkpoint_every=0)
    raw["server"]["count"] = 2
    proc = run_mpi(6, ["train", write_config(tmp_path / "run.yaml", raw)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw["server"]["count"] = 1
    raw["run"]["output_dir"] = str(tmp_path / "one")
    run_in_process(from_dict(raw), resume=False)
    reference = load_rank(str(tmp_path / "one"), 3, 0)["state"]["net"]["model"]
    for rank in (0, 1):
        replica = load_rank(str(tmp_path / "two"), 3, rank)["state"]["net"]["model"]
        for name, value in reference.items():
            torch.testing.assert_close(replica[name], value, rtol=1e-4, atol=1e-5, msg=f"rank {rank}: {name}")
