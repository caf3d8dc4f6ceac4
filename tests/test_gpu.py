"""The CUDA paths: a GPU server (bf16 autocast, channels_last, pinned staging) with CPU
clients, and torch.compile. Skipped without a GPU; tools/gpu_check.py measures speed."""

import h5py
import numpy as np
import pytest
import torch
from conftest import tiny_config

from collafuse_hpc.config import from_dict
from collafuse_hpc.run import run_in_process

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _server_losses(out):
    with h5py.File(out / "results.h5") as f:
        return f["server/rounds/loss_server"][()], f["clients/c0/samples/images"][()]


def test_gpu_server_with_cpu_clients_trains_and_samples(tmp_path, shards):
    raw = tiny_config(shards, tmp_path, [0.25, 0.5], rounds=4, checkpoint_every=0)
    raw["server"]["device"] = "cuda"
    raw["clients"][1]["wire_dtype"] = "bfloat16"
    summaries = run_in_process(from_dict(raw), resume=False)
    losses, samples = _server_losses(tmp_path)
    assert np.isfinite(losses).all() and samples.shape == (4, 1, 8, 8)
    assert summaries[0]["gpu_peak_memory_bytes"] > 0


def test_compiled_server_matches_eager(tmp_path, shards):
    out = {}
    for compiled in (False, True):
        raw = tiny_config(shards, tmp_path / str(compiled), [0.25, 0.5], rounds=3, checkpoint_every=0)
        raw["server"].update(device="cuda", compile=compiled)
        run_in_process(from_dict(raw), resume=False)
        out[compiled] = _server_losses(tmp_path / str(compiled))[0]
    np.testing.assert_allclose(out[True], out[False], rtol=0.05)


def test_evaluate_on_gpu_a_run_trained_on_cpu(tmp_path, shards):
    from collafuse_hpc.evaluate import evaluate

    raw = tiny_config(shards, tmp_path / "out", [0.25, 0.5], rounds=2)
    run_in_process(from_dict(raw), resume=False)
    raw["eval"]["device"] = "cuda"
    report = evaluate(from_dict(raw))
    assert np.isfinite(report["pooled"]["collaborative"]["fid"]) and report["c0"]["compute"]["sampling_ideal_ratio"]


def test_fid_inception_features_on_gpu_match_cpu(tmp_path):
    from collafuse_hpc.features import FIDInceptionV3, features, load_extractor

    torch.manual_seed(0)
    torch.save(FIDInceptionV3().state_dict(), tmp_path / "w.pth")
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    out = {}
    for name in ("cpu", "cuda"):
        extract, _ = load_extractor("inception", str(tmp_path / "w.pth"), torch.device(name))
        out[name] = features(extract, x, 4, torch.device(name))
    np.testing.assert_allclose(out["cuda"], out["cpu"], rtol=1e-2, atol=1e-3)
