"""The CUDA paths: a GPU server (bf16 autocast, channels_last, pinned staging) with CPU
clients, and torch.compile. Skipped without a GPU; tools/gpu_check.py measures speed."""

import h5py
import numpy as np
import pytest
import torch
from conftest import tiny_config

from collafuse_hpc.config import from_dict
from collafuse_hpc.runtime.run import run_in_process

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
    assert summaries["server_0"]["gpu_peak_memory_bytes"] > 0


def test_clients_hosted_on_the_gpu_match_them_on_the_cpu(tmp_path, shards):
    """Three clients of one rank as members of one model on the GPU (grouped convolutions,
    channels_last weights, bf16 autocast) train and sample like the same run on CPU."""
    out = {}
    for device in ("cpu", "cuda"):
        raw = tiny_config(shards, tmp_path / device, [0.25, 0.5, 1.0], rounds=3, checkpoint_every=0, clients_per_rank=3)
        for c in raw["clients"]:
            c["device"] = device
        run_in_process(from_dict(raw), resume=False)
        with h5py.File(tmp_path / device / "results.h5") as f:
            out[device] = np.array([f[f"clients/c{k}/rounds/loss_local"][()] for k in range(3)])
            assert f["clients/c2/samples/images"].shape == (4, 1, 8, 8)
    np.testing.assert_allclose(out["cuda"], out["cpu"], rtol=0.05)


def test_compiled_server_matches_eager(tmp_path, shards):
    out = {}
    for compiled in (False, True):
        raw = tiny_config(shards, tmp_path / str(compiled), [0.25, 0.5], rounds=3, checkpoint_every=0)
        raw["server"].update(device="cuda", compile=compiled)
        run_in_process(from_dict(raw), resume=False)
        out[compiled] = _server_losses(tmp_path / str(compiled))[0]
    np.testing.assert_allclose(out[True], out[False], rtol=0.05)


def test_evaluate_on_gpu_a_run_trained_on_cpu(tmp_path, shards):
    from collafuse_hpc.evaluation.evaluate import evaluate

    raw = tiny_config(shards, tmp_path / "out", [0.25, 0.5], rounds=2)
    run_in_process(from_dict(raw), resume=False)
    raw["eval"].update(device="cuda", compute=True)
    report = evaluate(from_dict(raw))
    assert np.isfinite(report["pooled"]["collaborative"]["fid"]) and report["c0"]["compute"]["sampling_ideal_ratio"]


def test_fid_inception_features_on_gpu_match_cpu_for_both_file_forms(tmp_path):
    from collafuse_hpc.evaluation.features import features, load_extractor
    from collafuse_hpc.evaluation.inception import SIZE, FIDInceptionV3

    torch.manual_seed(0)
    net = FIDInceptionV3().eval()
    torch.save(net.state_dict(), tmp_path / "w.pth")
    torch.jit.save(torch.jit.trace(net, torch.zeros(1, 3, SIZE, SIZE)), tmp_path / "w.pt")  # forward(x) convention
    images = np.random.default_rng(0).integers(0, 256, (8, 3, 32, 32), dtype=np.uint8)
    out = {}
    for name in ("cpu", "cuda"):
        for form in ("w.pth", "w.pt"):
            extract, _ = load_extractor("inception", str(tmp_path / form), torch.device(name))
            out[name, form] = features(extract, images, 4, torch.device(name))
    for key, value in out.items():
        np.testing.assert_allclose(value, out["cpu", "w.pth"], rtol=1e-2, atol=1e-3, err_msg=str(key))
