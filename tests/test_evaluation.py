"""Evaluation: FID/KID against closed forms, the feature extractors, disclosure,
the evaluate command on real short runs, inspection tools and the sweep report."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import MPIRUN_ENV, run_mpi, tiny_config, write_config

from collafuse_hpc import metrics
from collafuse_hpc.cli import main
from collafuse_hpc.config import from_dict
from collafuse_hpc.data import ShardReader, to_model_range
from collafuse_hpc.diffusion import beta_schedule
from collafuse_hpc.evaluate import SETS, evaluate
from collafuse_hpc.features import ENV_VAR, FIDInceptionV3, features, load_extractor
from collafuse_hpc.run import run_in_process

ROOT = Path(__file__).resolve().parents[1]


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    # commuting covariances: Tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt(s1) - sqrt(s2))^2
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    s1, s2 = np.array([1.0, 2.0, 0.5, 3.0]), np.array([4.0, 1.0, 0.5, 0.2])
    sigma1, sigma2 = q @ np.diag(s1) @ q.T, q @ np.diag(s2) @ q.T
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert metrics.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(want, rel=1e-9)
    assert metrics.frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0, abs=1e-9)
    # from samples, the estimate converges to the closed form
    x = rng.multivariate_normal(mu1, sigma1, 200_000)
    y = rng.multivariate_normal(mu2, sigma2, 200_000)
    assert metrics.fid(x, y) == pytest.approx(want, rel=0.02)


def _kernel_mean(m1, s1, m2, s2):
    """E (x y + 1)^3 for independent x ~ N(m1, s1^2), y ~ N(m2, s2^2) (d = 1)."""

    def moments(m, s):
        return m, m * m + s * s, m**3 + 3 * m * s * s

    a, b = moments(m1, s1), moments(m2, s2)
    return a[2] * b[2] + 3 * a[1] * b[1] + 3 * a[0] * b[0] + 1


def test_kid_is_unbiased_and_matches_the_closed_form_mmd():
    rng = np.random.default_rng(1)
    x, y = rng.normal(0.0, 1.0, (20_000, 1)), rng.normal(0.5, 0.8, (20_000, 1))
    want = _kernel_mean(0, 1, 0, 1) + _kernel_mean(0.5, 0.8, 0.5, 0.8) - 2 * _kernel_mean(0, 1, 0.5, 0.8)
    mean, std = metrics.kid(x, y, subsets=50, subset_size=2000)
    assert mean == pytest.approx(want, rel=0.1) and std > 0
    same, _ = metrics.kid(x, rng.normal(0.0, 1.0, (20_000, 1)), subsets=50, subset_size=2000)
    assert abs(same) < 0.05 * want  # unbiased: about 0 for equal distributions


def test_pixel_similarity_and_disclosure_numbers():
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    assert metrics.ssim(x, x) == pytest.approx(1.0)
    assert metrics.psnr(x, x + 0.1) == pytest.approx(10 * math.log10(4 / 0.01))
    assert metrics.ssim(x, torch.rand(4, 3, 16, 16) * 2 - 1) < 0.2
    assert metrics.snr(0.8) == pytest.approx(4.0)
    assert metrics.gdp_mu(100, 0.8) == pytest.approx(2 * math.sqrt(400))
    assert metrics.gdp_mu(100, 0.8, releases=4) == pytest.approx(80)
    assert "none in practice" in metrics.gdp_reading(80) and "strong" in metrics.gdp_reading(0.5)


def test_inception_state_dict_and_torchscript_forms_load_and_a_missing_file_says_how_to_stage(tmp_path, monkeypatch):
    torch.manual_seed(0)
    net = FIDInceptionV3().eval()
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"] = torch.zeros(1008, 2048)  # pytorch-fid's file also holds the classifier
    torch.save(state, tmp_path / "pt_inception.pth")
    extract, identity = load_extractor("inception", str(tmp_path / "pt_inception.pth"), torch.device("cpu"))
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        want = net(x.expand(-1, 3, -1, -1))
    assert identity.startswith("inception-") and torch.allclose(extract(x), want, atol=1e-5)
    assert features(extract, x, 2, torch.device("cpu")).shape == (3, 2048)

    class StandIn(torch.nn.Module):  # the TorchScript interface of StyleGAN's inception-2015-12-05.pt
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return x.mean((2, 3)) if return_features else x

    torch.jit.save(torch.jit.script(StandIn()), tmp_path / "inception.pt")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "inception.pt"))
    extract, _ = load_extractor("inception", "", torch.device("cpu"))
    assert torch.allclose(extract(x), (x.expand(-1, 3, -1, -1).mean((2, 3)) + 1) * 127.5)

    monkeypatch.delenv(ENV_VAR)
    with pytest.raises(ValueError, match="no weights file is given: stage the FID Inception weights"):
        load_extractor("inception", "", torch.device("cpu"))
    with pytest.raises(ValueError, match="'/nowhere/w.pth' not found: stage"):
        load_extractor("inception", "/nowhere/w.pth", torch.device("cpu"))
    (tmp_path / "other.pth").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="neither TorchScript nor a PyTorch state dict"):
        load_extractor("inception", str(tmp_path / "other.pth"), torch.device("cpu"))


@pytest.mark.skipif(not os.environ.get(ENV_VAR), reason=f"real FID Inception weights not staged (set {ENV_VAR})")
def test_fid_with_the_real_inception_weights(shards):
    extract, _ = load_extractor("inception", "", torch.device("cpu"))
    reader = ShardReader(shards[0], "train")
    x = to_model_range(reader.read(np.arange(200))[0], "cpu")
    f = features(extract, x, 50, torch.device("cpu"))
    noise = features(extract, torch.rand_like(x) * 2 - 1, 50, torch.device("cpu"))
    assert f.shape == (200, 2048)
    assert metrics.fid(f[:100], f[100:]) < metrics.fid(f[:100], noise[:100])


def test_evaluate_writes_metrics_for_every_set_and_reuses_cached_real_features(tmp_path, shards):
    raw = tiny_config(shards, tmp_path / "out", [0.25, 1.0], rounds=6, checkpoint_every=0)
    raw["clients"][0]["wire_dtype"] = "bfloat16"
    raw["eval"]["batch"] = 3  # 8 images per set, generated in batches of 3, 3 and 2
    cfg = from_dict(raw)
    run_in_process(cfg, resume=False)
    report = evaluate(cfg)
    assert set(report["c0"]) == {*SETS, "disclosure", "compute"}
    assert set(report["c1"]) == {"collaborative", "client_alone", "disclosure", "compute"}  # c = 1 sends nothing
    d = report["c0"]["disclosure"]
    abar = np.cumprod(1 - beta_schedule("linear", 20))[5 - 1]
    assert d["t_c"] == 5 and d["snr"] == pytest.approx(abar / (1 - abar))
    n_train = len(ShardReader(shards[0]))
    assert d["releases"] == math.ceil(6 * 6 / n_train)
    assert d["mu_composed"] == pytest.approx(2 * math.sqrt(64 * abar / (1 - abar)) * math.sqrt(d["releases"]))
    assert report["c1"]["disclosure"]["releases"] == 0 and report["c1"]["disclosure"]["reading"] == "nothing sent"
    assert report["c0"]["compute"]["sampling_ideal_ratio"] == 0.25
    with h5py.File(tmp_path / "out/results.h5") as f:
        m = f["metrics"]
        assert m.attrs["extractor"] == "pixels" and m.attrs["checkpoint_round"] == 6
        assert m["c0/cut"].attrs["images"] == 8 and m["pooled/collaborative"].attrs["images"] == 16
        assert m["c0/collaborative/images"].dtype == np.uint8 and m["c0/collaborative/images"].shape == (8, 1, 8, 8)
    # real-image features come from the cache on the next evaluation
    caches = sorted((tmp_path / "feature_cache").glob("*.npy"))
    assert len(caches) == 2  # one per client shard
    for path in caches:
        np.save(path, np.load(path) + 5.0)  # shift: every FID against real images must grow
    again = evaluate(cfg)
    assert again["c0"]["cut"]["fid"] > report["c0"]["cut"]["fid"] + 100


def test_evaluate_without_a_checkpoint_or_weights_is_a_clear_error(tmp_path, shards, capsys):
    raw = tiny_config(shards, tmp_path / "out", [0.25, 0.5], rounds=1)
    cfg = write_config(tmp_path / "run.yaml", raw)
    assert main(["evaluate", cfg]) == 2
    assert "no complete checkpoint set" in capsys.readouterr().err
    assert main(["evaluate", cfg, "--set", "eval.extractor=inception"]) == 2
    assert "stage the FID Inception weights" in capsys.readouterr().err


def test_inspect_export_and_compare_on_real_runs_and_a_crashed_one(tmp_path, shards, capsys):
    paths = []
    for name, cut in (("a", 0.25), ("b", 0.5)):
        raw = tiny_config(shards, tmp_path / name, [cut, cut], rounds=2)
        raw["eval"]["at_end"] = name == "a"
        assert main(["train", write_config(tmp_path / f"{name}.yaml", raw), "--in-process"]) == 0
        paths.append(str(tmp_path / name / "results.h5"))
    capsys.readouterr()
    assert main(["inspect", paths[0]]) == 0
    text = capsys.readouterr().out
    assert "clients/c0 t_c=5 (c=0.25)" in text and "audit: 12 images in 2 training messages" in text
    assert "pooled     collaborative  FID" in text and "disclosure: SNR" in text
    assert main(["inspect", paths[1], "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["roles"]["server"]["rounds_logged"] == 2 and "metrics (not evaluated" in data["missing"][0]
    assert main(["export", paths[0], "--out", str(tmp_path / "grids"), "--npy"]) == 0
    assert (tmp_path / "grids/samples_c0.png").exists() and np.load(tmp_path / "grids/c0_cut.npy").dtype == np.uint8
    assert main(["compare", *paths]) == 0
    table = capsys.readouterr().out
    assert "cut ratio(s)" in table and "[0.25]" in table and "[0.5]" in table and "FID pooled cut" in table
    (tmp_path / "b/parts/client_c1.h5").unlink()  # as if that rank had crashed before writing
    assert main(["inspect", paths[1]]) == 1
    assert "missing: clients/c1: part file parts/client_c1.h5" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "nothing.h5")]) == 2


def test_report_writes_the_table_figure_and_grids(tmp_path, shards):
    paths = []
    for cut in (0.25, 0.75):
        raw = tiny_config(shards, tmp_path / f"c{cut}", [cut, cut], rounds=2)
        cfg = from_dict(raw)
        run_in_process(cfg, resume=False)
        evaluate(cfg)
        paths.append(str(tmp_path / f"c{cut}/results.h5"))
    out = tmp_path / "report"
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools/report.py"), *reversed(paths), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    rows = (out / "table.csv").read_text().splitlines()
    assert rows[0].startswith("c,rounds,fid_collaborative") and [r.split(",")[0] for r in rows[1:]] == ["0.25", "0.75"]
    assert "| 0.25 |" in (out / "table.md").read_text()
    assert (out / "tradeoff.png").stat().st_size > 10_000
    assert (out / "grids/c0.25/c0_server_alone.png").exists()


@pytest.mark.mpi
def test_local_sweep_trains_evaluates_and_reports(tmp_path, shards):
    raw = tiny_config(shards, tmp_path / "unused", [0.5, 0.5], rounds=2)
    cfg = write_config(tmp_path / "run.yaml", raw)
    env = {**os.environ, **MPIRUN_ENV, "CUTS": "0.25 1.0", "SWEEP_DIR": str(tmp_path / "sweep")}
    done = subprocess.run(
        ["bash", "jobs/sweep_local.sh", cfg], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = (tmp_path / "sweep/report/table.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["0.25", "1.0"]


@pytest.mark.mpi
def test_at_end_evaluation_under_mpirun(tmp_path, shards):
    raw = tiny_config(shards, tmp_path / "out", [0.25, 0.5], rounds=2)
    raw["eval"]["at_end"] = True
    done = run_mpi(3, ["train", write_config(tmp_path / "run.yaml", raw)])
    assert done.returncode == 0, done.stderr[-3000:]
    with h5py.File(tmp_path / "out/results.h5") as f:
        assert f["metrics/pooled/collaborative"].attrs["images"] == 16
