"""Performance features: the half-precision wire, the profiler option, the client
compute measurement and the benchmark plumbing (the GPU check runs on CPU here)."""

import json
import os
import subprocess
import sys

import h5py
import measure
import numpy as np
import pytest
import torch
from conftest import harness, run_mpi, tiny_config, write_config

from collafuse_hpc.config import from_dict
from collafuse_hpc.evaluation.compute import client_compute
from collafuse_hpc.roles.client import Client
from collafuse_hpc.runtime.local_wire import LocalWire
from collafuse_hpc.runtime.run import run_in_process
from collafuse_hpc.runtime.wire import HEADER_LEN, PART_LEN, Kind

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bfloat16_wire_halves_the_bytes_and_the_audit_counts_what_was_sent(tmp_path, shards, monkeypatch):
    raw = tiny_config(shards, tmp_path, [0.25, 0.25], rounds=3, checkpoint_every=0)
    raw["clients"][0]["wire_dtype"] = "bfloat16"
    payloads = []
    original = LocalWire.send

    def recording_send(self, dst, msg):
        if msg.payload is not None and msg.kind in (Kind.TRAIN, Kind.SAMPLE_REPLY):
            payloads.append((self.rank, dst, msg.kind, msg.payload.dtype))
        original(self, dst, msg)

    monkeypatch.setattr(LocalWire, "send", recording_send)
    run_in_process(from_dict(raw), resume=False)
    assert {d for r, dst, _, d in payloads if 1 in (r, dst)} == {torch.bfloat16}  # both ways for c0
    assert {d for r, dst, _, d in payloads if 2 in (r, dst)} == {torch.float32}
    with h5py.File(tmp_path / "results.h5") as f:
        train = [f[f"clients/{c}/audit/nbytes"][0] for c in ("c0", "c1")]
        header = (HEADER_LEN + PART_LEN) * 8  # with the client's row of the parts table
        assert train[0] == header + 6 * 64 * 2 and train[1] == header + 6 * 64 * 4
        assert np.isfinite(f["clients/c0/samples/x_handover"][()]).all()
        server = f["server/rounds"]
        assert server["bytes_received"][0] == train[0] + train[1]


def _has_ops(path) -> bool:
    with open(path) as f:
        return any(e.get("name", "").startswith("aten::") for e in json.load(f)["traceEvents"])


def test_profile_rounds_writes_one_chrome_trace_in_process(tmp_path, shards):
    raw = tiny_config(shards, tmp_path, [0.25, 1.0], rounds=4, checkpoint_every=0, profile_rounds=1)
    run_in_process(from_dict(raw), resume=False)
    assert _has_ops(tmp_path / "profile/server.json")
    assert sorted(os.listdir(tmp_path / "profile")) == ["server.json"]  # one profiler per process


@pytest.mark.mpi
def test_profile_rounds_writes_a_chrome_trace_per_rank(tmp_path, shards):
    raw = tiny_config(shards, tmp_path / "out", [0.25, 1.0], rounds=4, checkpoint_every=0, profile_rounds=1)
    done = run_mpi(3, ["train", write_config(tmp_path / "run.yaml", raw)])
    assert done.returncode == 0, done.stderr
    for name in ("server", "client_c0", "client_c1"):
        assert _has_ops(tmp_path / "out/profile" / f"{name}.json"), name


@pytest.mark.parametrize("labels", [False, True])
def test_client_compute_share_of_sampling_follows_the_cut(tmp_path, shards, labels):
    """A client that uses labels too: its FLOPs are counted on one image, which takes one
    image's labels (it was given the labels of the whole timing batch)."""
    raw = tiny_config(shards, tmp_path, [0.25], rounds=1)
    raw["diffusion"]["sampling_steps"] = 0
    raw["clients"][0]["labels"] = labels
    client = Client(from_dict(raw), 0, torch.device("cpu"))
    before = {k: v.clone() for k, v in client.net.model.state_dict().items()}
    m = client_compute(client, n=4, repeats=1)
    assert (m["sampling_steps_client"], m["sampling_steps_full"]) == (5, 20)
    assert m["sampling_ideal_ratio"] == 0.25
    assert m["sampling_flops_client"] / m["sampling_flops_full"] == pytest.approx(0.25)
    assert 0 < m["sampling_time_ratio"] < 1
    # one round's client work is one local step plus drawing x_c: about one full-chain step
    assert m["train_flops_client"] == pytest.approx(m["train_flops_full"], rel=0.05)
    after = client.net.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "measuring must not train the client"
    assert client.audit == []


def test_a_sampling_loops_flops_are_those_of_every_model_call_it_makes(tmp_path, shards):
    """Counting each input shape once gives FlopCounterMode's count over the whole loop,
    and the count follows the steps the loop runs (not steps x one step)."""
    from collafuse_hpc.evaluation.compute import _flops, _loop_flops

    client = Client(from_dict(tiny_config(shards, tmp_path, [0.5])), 0, torch.device("cpu"))
    eps, diffusion, x = client.eps_model(True, None), client.diffusion, torch.zeros(2, 1, 8, 8)
    grid = client.cut.full_chain().sampling_grids()[1]
    whole = _flops(lambda: diffusion.p_sample_loop(eps, x, grid))
    assert _loop_flops(diffusion, eps, x, grid) == whole > 0
    assert _loop_flops(diffusion, eps, x, grid[:5]) * (len(grid) - 1) == whole * 4


@pytest.mark.slow
def test_read_run_and_baselines_on_a_real_distributed_run(tmp_path):
    shards = harness.synthetic_shards(str(tmp_path / "shards"), 2, 8, 1, train=32, test=8)
    model = {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": []}
    raw = harness.bench_config(
        shards, str(tmp_path / "run"), model, model, **{"run.rounds": 6, "clients.batch_size": 4}
    )
    environ = dict(os.environ)
    harness.launch(raw, timeout_s=240)
    assert dict(os.environ) == environ  # the launcher's MPI settings stay in its child
    t = measure.read_run(raw["run"]["output_dir"], skip=2)
    # 4 rounds kept, 2 clients x 4 images each, every x_c message: 4 images, one header, one row of the parts table
    assert t.bytes_per_image == pytest.approx(measure.x_c_bytes(raw) + (HEADER_LEN + PART_LEN) * 8 / 4)
    assert t.server_images_per_s * t.server_round_s * 4 == pytest.approx(4 * 8)
    assert t.server_compute_s_per_image * 4 * 8 == pytest.approx(t.server_round_s * 4 * (1 - t.server_wire_fraction))
    assert 0 < t.client_wait_fraction < 1 and t.run_images_per_s > 0 and t.gpu_peak_memory_bytes == 0
    cpu = torch.device("cpu")
    assert measure.server_alone(raw, 2, 1, cpu) > 0 and measure.plain_ddpm(raw, 2, 1, cpu) > 0


@pytest.mark.mpi
def test_gpu_check_runs_on_cpu_and_says_so(tmp_path):
    env = harness.mpi_env()
    cmd = [sys.executable, os.path.join(ROOT, "tools/gpu_check.py"), "--clients", "2", "--rounds", "8"]
    done = subprocess.run([*cmd, "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no GPU found: running the same check on CPU" in done.stdout
    with open(tmp_path / "gpu_check.json") as f:
        result = json.load(f)
    assert result["device"] == "cpu" and 0 < result["A_clients_idle"]["efficiency"] < 2
    many = result["C_many_clients"]  # 8 clients hosted by one rank, in one process with the server
    assert many["clients"] == 8 and many["server_images_per_s"] > 0 and many["run_images_per_s"] > 0


def test_benchmarks_never_overwrite_an_earlier_measurement(tmp_path):
    """A benchmark's JSON is a record: an existing one is refused before anything is measured."""
    (tmp_path / "m.json").write_text("earlier")
    (tmp_path / "server.json").write_text("earlier")
    (tmp_path / "gpu_check.json").write_text("earlier")
    tools = os.path.join(ROOT, "tools")
    commands = [
        *([f"{tools}/{name}.py", "--json", str(tmp_path / "m.json")] for name in ("bench_eval", "bench_sampler")),
        *([f"{tools}/{name}.py", "--json", str(tmp_path / "m.json")] for name in ("bench_clients", "bench_loader")),
        [f"{tools}/bench.py", "wire", "server", "--out", str(tmp_path)],
        [f"{tools}/gpu_check.py", "--out", str(tmp_path)],
    ]
    for cmd in commands:  # refused before torch is imported: 0.3 s of CPU, not 2.3
        done = subprocess.run([sys.executable, "-X", "importtime", *cmd], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, (cmd, done.stdout, done.stderr)
        assert "exists: an earlier measurement would be lost; write elsewhere, or remove it first" in done.stderr, cmd
        # -X importtime indents an import by its depth: torch imported by a tool's own import ends "|   torch"
        assert not [line for line in done.stderr.splitlines() if line.rsplit("|", 1)[-1].strip() == "torch"], cmd
    assert {p.read_text() for p in tmp_path.iterdir()} == {"earlier"} and len(list(tmp_path.iterdir())) == 3


def test_bench_rejects_an_unknown_benchmark_by_name():
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools/bench.py"), "server", "speed"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "unknown benchmark(s) ['speed']; choose from all, server" in done.stderr
