"""What the parties could learn (evaluation/privacy.py, the attacks at k releases): each
metric on cases with a known answer, and each test named after the mutation it catches
(the metric broken on purpose: the wrong member set, distances to the test images
instead of the training images, one release instead of k)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import scipy.stats
import torch
from conftest import tiny_config

from collafuse_hpc.config import ModelConfig, from_dict
from collafuse_hpc.data import ShardReader, to_model_range
from collafuse_hpc.data.prepare import prepare
from collafuse_hpc.data.sources import read_digits
from collafuse_hpc.diffusion.gaussian import GaussianDiffusion, beta_schedule
from collafuse_hpc.diffusion.unet import UNet
from collafuse_hpc.evaluation import attacks, disclosure, metrics, privacy
from collafuse_hpc.roles.client import Client
from collafuse_hpc.roles.server import Server
from collafuse_hpc.tables import with_interval

T = 20
DIFFUSION = GaussianDiffusion(beta_schedule("linear", T))


def _stream(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(shard: str, split: str, count: int | None = None) -> np.ndarray:
    reader = ShardReader(shard, split)
    return reader.read(np.arange(len(reader) if count is None else count))[0]


def memorizer(train: np.ndarray) -> privacy.Target:
    """A client-like model that memorized ``train`` (uint8 [M, C, H, W]): the ideal denoiser
    of their empirical distribution (the posterior mean of x_0 over them given x_t), which
    training on them alone converges to."""
    flat = to_model_range(train, "cpu").flatten(1).double()  # (M, D)

    def eps(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        abar = DIFFUSION.abar(t).view(-1, 1)  # (B, 1) float64
        xt = x.flatten(1).double()
        d2 = (xt * xt).sum(1, keepdim=True) - 2 * abar.sqrt() * xt @ flat.T + abar * (flat * flat).sum(1)[None]
        weights = torch.softmax(-d2 / (2 * (1 - abar)), dim=1)  # (B, M)
        x0_hat = weights @ flat
        return ((xt - abar.sqrt() * x0_hat) / (1 - abar).sqrt()).float().view_as(x)

    return privacy.Target("client", eps, (1, T))


def test_auc_and_tpr_at_low_fpr_have_their_known_values():
    low, high = np.arange(10.0), np.arange(10.0) + 100
    assert privacy.roc_auc(low, high) == 1 and privacy.roc_auc(high, low) == 0
    assert privacy.roc_auc(np.ones(5), np.ones(7)) == 0.5  # ties count half
    assert privacy.roc_auc(np.array([1.0, 3.0]), np.array([2.0, 4.0])) == 0.75  # 3 of 4 pairs ordered
    ties = np.random.default_rng(1)
    for n, m in ((1, 1), (7, 12), (40, 25)):  # against every pair counted, with many ties
        members, nonmembers = ties.integers(0, 6, n).astype(float), ties.integers(0, 6, m).astype(float)
        pairs = (members[:, None] < nonmembers[None, :]) + 0.5 * (members[:, None] == nonmembers[None, :])
        assert privacy.roc_auc(members, nonmembers) == pytest.approx(pairs.mean(), abs=1e-12)
    assert np.isnan(privacy.roc_auc(np.array([1.0, np.nan]), np.ones(3)))  # a diverged model: no AUC, not chance
    rng = np.random.default_rng(0)
    same = rng.normal(size=(2, 4000))
    assert abs(privacy.roc_auc(*same) - 0.5) < 0.02 and abs(privacy.tpr_at_fpr(*same) - 0.01) < 0.006
    assert privacy.tpr_at_fpr(low, high) == 1 and privacy.tpr_at_fpr(high, low) == 0
    # 200 non-members: at most 2 flagged; the threshold is the third lowest of them
    nonmembers = np.arange(200.0)
    assert privacy.tpr_at_fpr(np.array([1.5, 2.5, 0.5]), nonmembers) == pytest.approx(2 / 3)
    figures = privacy.mia_figures("server", low, high, resamples=50, seed=0)
    assert figures["mia_server_auc"] == 1 and figures["mia_server_auc_low"] <= 1 <= figures["mia_server_auc_high"]
    assert set(figures) == {f"mia_server_{k}{e}" for k in ("auc", "tpr_at_1fpr") for e in ("", "_low", "_high")}


def test_wrong_member_set__a_model_that_memorized_the_training_images_reveals_them(shards):
    """Mutation caught: members taken from anything but the client's training images (its
    test split, another offset, another client's shard) gives an AUC near 0.5, not 1."""
    train = _images(shards[0], "train")
    scores = privacy.membership([memorizer(train)], shards[0], DIFFUSION, 40, _stream(), 64)
    members, nonmembers = scores["client"]
    assert len(members) == len(nonmembers) == 40
    assert privacy.roc_auc(members, nonmembers) > 0.9  # wrong members: about 0.5
    assert privacy.tpr_at_fpr(members, nonmembers) > 0.5
    # the candidates are the first 40 of each split, members first
    x0, y, m = privacy.candidates(shards[0], 40, torch.device("cpu"))
    want = np.concatenate([train[:40], _images(shards[0], "test", 40)])
    assert m == 40 and torch.equal(x0, to_model_range(want, "cpu")) and y is not None and len(y) == 80


def test_two_halves_of_held_out_images_are_told_apart_by_chance_only(shards):
    """The known answer 0.5: held-out images scored against held-out images under the
    memorizing model (neither half is a member)."""
    test = _images(shards[0], "test")
    half = len(test) // 2
    target = memorizer(_images(shards[0], "train"))
    x0 = to_model_range(test[: 2 * half], "cpu")
    s = privacy.loss_scores(target, DIFFUSION, x0, None, _stream(1), 64)
    figures = privacy.mia_figures("client", s[:half], s[half:], resamples=200, seed=0)
    assert abs(figures["mia_client_auc"] - 0.5) < 0.15
    assert figures["mia_client_auc_low"] < 0.5 < figures["mia_client_auc_high"]


def test_the_server_scores_candidates_as_the_x_c_it_saw(shards, tmp_path):
    """The server's target: t in t_c+1..T on its anchor, each candidate entering as a fresh
    x_c at t_c in the wire dtype (mean sqrt(abar) x_0, variance 1 - abar)."""
    cfg = from_dict(tiny_config(shards, tmp_path, [0.25]))
    client, server = Client(cfg, 0, torch.device("cpu")), Server(cfg, [0], torch.device("cpu"))
    target = privacy.server_target(server, client)
    t_c = client.cut.t_c
    assert (target.name, target.steps, target.anchor) == ("server", (t_c + 1, T), t_c)
    x0 = to_model_range(_images(shards[0], "train", 8), "cpu").repeat(500, 1, 1, 1)
    x_c = target.data(x0, _stream())
    abar = DIFFUSION.alphas_cumprod[t_c]
    noise = (x_c - abar**0.5 * x0) / (1 - abar) ** 0.5
    assert abs(float(noise.mean())) < 0.01 and float(noise.var()) == pytest.approx(1, abs=0.01)
    assert privacy.attack_steps(t_c + 1, T) == [7, 11, 15, 19]  # midpoints of 4 strata of 6..20
    assert privacy.attack_steps(1, 2) == [1, 2]
    scores = privacy.loss_scores(target, DIFFUSION, x0[:6], None, _stream(), 8)
    assert scores.shape == (6,) and np.isfinite(scores).all()


@pytest.mark.slow  # 150 optimizer steps: 4 to 10 s on a busy core
def test_a_trained_model_that_memorized_a_handful_of_images_reveals_them(shards):
    """A tiny UNet trained only on 6 training images (the candidates' members) until it
    memorized them: AUC near 1 against 6 held-out images."""
    torch.manual_seed(0)
    members = to_model_range(_images(shards[0], "train", 6), "cpu")
    net = UNet(ModelConfig(base_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[]), 1, 8)
    optim = torch.optim.Adam(net.parameters(), lr=3e-3)
    generator = _stream()

    def eps(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return net(x, t)

    for _ in range(150):
        t = torch.randint(1, T + 1, (len(members),), generator=generator)
        noise = torch.randn(members.shape, generator=generator)
        loss = DIFFUSION.training_losses(eps, members, t, noise).mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
    net.eval()
    scores = privacy.membership([privacy.Target("client", eps, (1, T))], shards[0], DIFFUSION, 6, generator, 48)
    assert privacy.roc_auc(*scores["client"]) > 0.9


def test_distances_to_test_images__training_images_are_copies_and_held_out_ones_are_not(tmp_path):
    """Known answers: the client's training images score 1; held-out images, scored as
    samples against the other half of the held-out images as the baseline, about
    COPY_PERCENTILE / 100 = 0.05, in [0.01, 0.12]. One client of all 1,797 digits, half of
    them held out: 449 baseline images against 449 "samples", exchangeable, so the rate
    is the share of 449 draws below the 5th percentile of 449 others: mean 0.052, standard
    deviation 0.015; of 10^6 simulated splits, 0.9e-4 fell below 0.01 and 0.8e-4 above 0.12.
    (A client's own ~107 test images would put 7% of splits below 0.01.) Mutation caught:
    distances to the test images instead of the training images (training images then
    score about 0.05, and held-out images nearly 1 or 0)."""
    shard = prepare(read_digits(), str(tmp_path), 1, "iid", size=8, test_fraction=0.5, seed=0)[0]
    train, test = _images(shard, "train"), _images(shard, "test")
    half = len(test) // 2
    assert half == 449

    def feats(images: np.ndarray) -> np.ndarray:  # a feature space other than the pixels: 2x2 means
        return images.reshape(len(images), 4, 2, 4, 2).mean((2, 4)).reshape(len(images), -1).astype(np.float64)

    baseline, held = test[:half], test[half : 2 * half]
    white = np.full_like(train[:50], 255)  # no digit: nothing copied
    made = {"collaborative": (train[:50], feats(train[:50])), "client_alone": (held, feats(held))}
    made["server_alone"] = (white, feats(white))
    reader = ShardReader(shard, "train")
    out = privacy.memorization(made, (baseline, feats(baseline)), reader, lambda _, x: feats(x), 100, 0)
    for space in ("pixel", "feature"):
        key = f"copy_rate_{space}"
        assert out["collaborative"][key] == 1
        assert 0.01 <= out["client_alone"][key] <= 0.12
        assert out["client_alone"][f"{key}_low"] <= out["client_alone"][key] <= out["client_alone"][f"{key}_high"]
        # at none or all of 50 samples every bootstrap resample agrees; the interval keeps Wilson's width
        assert out["server_alone"][key] == 0 and out["server_alone"][f"{key}_high"] == metrics.share_interval(0, 50)[1]
        assert out["collaborative"][f"{key}_low"] == metrics.share_interval(50, 50)[0] < 1


def test_averaged_releases_are_one_release_at_k_times_the_snr():
    t_c, k = 12, 25
    x0 = torch.rand(2000, 1, 4, 4) * 2 - 1
    x_bar = attacks.release(DIFFUSION, x0, t_c, k, torch.float32, _stream())
    abar = DIFFUSION.alphas_cumprod[t_c]
    assert float((x_bar - abar**0.5 * x0).var()) == pytest.approx((1 - abar) / k, rel=0.03)
    x_s, s = attacks.as_one_release(DIFFUSION, x_bar, t_c, k, _stream(1))
    snr = DIFFUSION.alphas_cumprod[1:] / (1 - DIFFUSION.alphas_cumprod[1:])  # SNR(1..T) at index t - 1
    assert s < t_c and snr[s - 1] <= k * snr[t_c - 1] < snr[s - 2]  # the least noisy step not above k SNR(t_c)
    a_s = DIFFUSION.alphas_cumprod[s]
    assert float((x_s - a_s**0.5 * x0).var()) == pytest.approx(1 - a_s, rel=0.03)
    assert attacks.as_one_release(DIFFUSION, x_bar, t_c, 1, _stream())[1] == t_c


def _attacked(shards: list[str], tmp_path, monkeypatch, releases: int, **eval_keys) -> tuple[dict, dict]:
    """disclosure.attack and attack_releases at ``releases`` on client 0 of two cut at c = 0.5
    (SNR(t_c) 0.055), its first 16 test images attacked and its first 16 training images
    the linkage candidates, pixels as features; both clients' models are the ideal
    denoiser of those test images (one that memorized them). ``eval_keys``: the config's
    eval keys changed. Returns (one release's figures, those at ``releases``)."""
    raw = tiny_config(shards, tmp_path, [0.5, 0.5])
    raw["eval"].update(eval_keys)
    cfg = from_dict(raw)
    clients = [Client(cfg, k, torch.device("cpu")) for k in range(2)]
    client = clients[0]
    test = _images(shards[0], "test", 16)
    x0 = to_model_range(test, "cpu")
    oracle = memorizer(test)
    for c in clients:
        monkeypatch.setattr(c, "eps_model", lambda ema, y: lambda x, t: oracle.eps(x, t, None))
    x_c = client.noised_to_cut(x0).float()
    feats = privacy.pixels

    def cached(_: str, images: np.ndarray) -> np.ndarray:
        return feats(images)

    real = feats(test)
    single = disclosure.attack(client, clients, x0, x_c, None, real, feats, cached, 16)
    many = disclosure.attack_releases(client, clients, x0, None, real, feats, cached, 16, releases, _stream(), single)
    return single, many


def test_one_release_instead_of_k__linkage_and_reconstruction_grow_with_the_run_s_releases(
    shards, tmp_path, monkeypatch
):
    """At a noisy cut one release links few images; the mean of 40 releases (40 times the
    SNR) links nearly all, and a denoiser that knows the images (one that memorized them)
    reconstructs them far better from it. Mutation caught: one release instead of k, of
    the probes or of the reconstructed images (the figures at k then are those of one)."""
    single, many = _attacked(shards, tmp_path, monkeypatch, 40, bootstrap=0)
    assert many["releases"] == 40 and set(many) == {"releases", *(f"{k}_releases" for k in disclosure.FIGURES)}
    assert many["recon_own_psnr_db_releases"] > single["recon_own_psnr_db"] + 5
    assert single["link_pixel_top1"] < 0.6 and many["link_pixel_top1_releases"] > 0.9
    single, once = _attacked(shards, tmp_path, monkeypatch, 1, bootstrap=0)
    assert all(once[f"{k}_releases"] == single[k] for k in disclosure.FIGURES)


def test_a_share_s_interval_is_wilson_s_and_keeps_a_width_at_none_and_all():
    """metrics.share_interval against scipy's Wilson interval, including the linkage rates
    a study point gives: none of 288 probes linked is [0, 1.96^2 / (288 + 1.96^2)], not the
    [0, 0] of +- 1.96 standard errors, and every probe linked mirrors it."""
    for n, k in ((288, 0), (288, 288), (288, 27), (16, 3), (1, 1)):
        wilson = scipy.stats.binomtest(k, n).proportion_ci(0.95, "wilson")
        assert metrics.share_interval(k, n) == pytest.approx((wilson.low, wilson.high), abs=1e-4)
    assert metrics.share_interval(0, 288)[1] == pytest.approx(1.96**2 / (288 + 1.96**2))
    assert metrics.share_interval(0, 0) == (0.0, 1.0)  # no trials: nothing known


def test_attack_figures_have_intervals_over_images_fid_s_in_a_classifier_s_features_only(shards, tmp_path, monkeypatch):
    """Every attack figure, at one release and at the run's releases, has its 95% interval
    around it (``<key>_low``/``_high``); none for eval.bootstrap 0, and the
    reconstruction FID's only with a classifier's features (as quality.py's FID). A linkage
    rate's interval is the Wilson score interval of its P = 16 probes' hits against fixed
    candidates, here checked against scipy's."""
    for releases in (1, 3):  # at one release the figures at k are copied, at 3 drawn
        single, many = _attacked(shards, tmp_path, monkeypatch, releases)
        for key in disclosure.FIGURES:
            for got, name in ((single, key), (many, f"{key}_releases")):
                if key.endswith("_fid"):  # pixel features
                    assert f"{name}_low" not in got and f"{name}_high" not in got
                else:
                    assert got[f"{name}_low"] <= got[name] <= got[f"{name}_high"], name
        for key, got in (("link_pixel_top1", single), ("link_feature_top5_releases", many)):
            wilson = scipy.stats.binomtest(round(got[key] * 16), 16).proportion_ci(0.95, "wilson")
            assert (got[f"{key}_low"], got[f"{key}_high"]) == pytest.approx((wilson.low, wilson.high), abs=1e-4)
    assert f"linkage top-1 {with_interval(single, 'link_pixel_top1')} (pixels)" in attacks.describe(single)
    assert with_interval(single, "link_pixel_top1").endswith("]")
    own = f"{with_interval(single, 'recon_own_psnr_db', 2)} dB / {with_interval(single, 'recon_own_ssim')} with its own"
    assert own in attacks.describe(single) and with_interval(single, "recon_own_psnr_db", 2).endswith("]")
    at_releases = f"reconstruction PSNR {with_interval(many, 'recon_own_psnr_db_releases', 2)} dB with its own model"
    assert at_releases in attacks.describe({**single, **many, "releases": 3}), "the printout's PSNR at k releases"
    single, many = _attacked(shards, tmp_path, monkeypatch, 3, extractor="classifier", classifier_path="x.pt")
    assert single["recon_own_fid_low"] <= single["recon_own_fid"] <= single["recon_own_fid_high"]
    assert many["recon_public_fid_releases_low"] <= many["recon_public_fid_releases"]
    single, many = _attacked(shards, tmp_path, monkeypatch, 3, bootstrap=0)
    assert not any(k.endswith(("_low", "_high")) for k in {**single, **many})
    assert f"linkage top-1 {single['link_pixel_top1']:.3f} (pixels)" in attacks.describe(single)


@pytest.mark.slow
def test_evaluate_writes_prints_and_reports_what_the_parties_could_learn(shards, tmp_path, capsys):
    """The attributes beside today's (per client and pooled), the printout, the parts'
    times in the record, and the report's table and trade-off figure."""
    from collafuse_hpc.evaluation.evaluate import PARTS, evaluate, print_report
    from collafuse_hpc.report.make import make_report
    from collafuse_hpc.runtime.run import run_in_process

    cfg = from_dict(tiny_config(shards, tmp_path / "run", [0.25, 1.0], rounds=4))
    run_in_process(cfg, resume=False)
    report = evaluate(cfg)
    print_report(report)
    printed = capsys.readouterr().out
    assert "c0: membership: server's model AUC" in printed and "client's model AUC" in printed
    assert "c1: copies: share of samples nearer a training image" in printed
    copies = report["c1"]["collaborative"]
    assert f"collaborative {with_interval(copies, 'copy_rate_pixel')} / " in printed and "copy_rate_pixel_low" in copies
    assert "releases per image, averaged (grouping known: an upper bound)" in printed
    with h5py.File(tmp_path / "run/results.h5") as f:
        m = f["metrics"]
        for who, models in (("c0", ("server", "client")), ("c1", ("client",)), ("pooled", ("server", "client"))):
            got = m[f"{who}/membership"].attrs
            for model in models:
                assert 0 <= got[f"mia_{model}_auc"] <= 1 and 0 <= got[f"mia_{model}_tpr_at_1fpr"] <= 1
            assert "mia_server_auc" in got or who == "c1"
        assert m["pooled/membership"].attrs["members"] == 16
        for who in ("c0", "c1"):
            assert 0 <= m[f"{who}/collaborative"].attrs["copy_rate_pixel"] <= 1
            assert 0 <= m[f"{who}/client_alone"].attrs["copy_rate_feature"] <= 1
        attack = m["c0/attack"].attrs
        assert attack["releases"] == m["c0/disclosure"].attrs["releases"] >= 1
        assert 0 <= attack["link_pixel_top1_releases"] <= 1
        record = [r for r in f["records"].values() if r.attrs["command"] == "evaluate"][-1]
        totals = record.attrs["totals"]
        timed = [part for part in PARTS if part != "client compute"]  # not measured: eval.compute false
        assert all(f"time_{part.replace(' ', '_')}_s" in totals for part in timed)
        assert "time_client_compute_s" not in totals
    out = tmp_path / "report"
    assert make_report([str(tmp_path / "run/results.h5")], str(out)) == 0
    table = (out / "table.md").read_text()
    assert "membership AUC (0.5: chance), server's model" in table and "copied samples, pixels" in table
    assert "linkage top-1 at the run's releases, pixels" in table and (out / "tradeoff.png").exists()


def test_evaluate_wires_each_client_s_own_members_training_images_and_releases(tmp_path, monkeypatch):
    """evaluate's wiring of the privacy metrics, end to end on a tiny run whose clients hold
    6 training images each and sent 12 (2 rounds of 6): every image released twice. Client
    c_k's own model is replaced by one that memorized c_k's training images, and its
    ``client_alone`` set by copies of them, so that the right wiring has known answers:
    - membership AUC 1 for each client's model (its members are what it memorized); with
      members and non-members from another client's shard (``cfg.clients[other].shard``),
      neither is memorized: about 0.5;
    - copy rates 1 for the copies; against the client's test split instead of its train
      split the held-out images are their own nearest neighbours (5th percentile 0): 0;
    - the attacks at k releases at disclosure's count, ceil(12 / 6) = 2, the audit's images
      over the train split: with one release passed instead, ``releases`` is 1."""
    from collafuse_hpc.evaluation import evaluate as evaluate_module
    from collafuse_hpc.results.schema import audit_totals
    from collafuse_hpc.runtime.run import run_in_process

    shards = prepare(read_digits(), str(tmp_path / "shards"), 2, "class", size=8, train_size=6, test_size=10)
    raw = tiny_config(shards, tmp_path / "run", [0.25, 0.25], rounds=2)
    raw["eval"].update(sets=["collaborative", "client_alone"], images=6, bootstrap=20)
    cfg = from_dict(raw)
    run_in_process(cfg, resume=False)

    def memorized(client: Client) -> privacy.Target:
        return privacy.Target("client", memorizer(_images(shards[client.index], "train")).eps, (1, client.cut.t_c))

    sample = evaluate_module.image_sets

    def with_copies(cfg, servers, group, x_c, n, check):
        made = sample(cfg, servers, group, x_c, n, check)
        for client in group:
            made[client.index]["client_alone"] = to_model_range(_images(shards[client.index], "train", n), "cpu")
        return made

    monkeypatch.setattr(privacy, "client_target", memorized)
    monkeypatch.setattr(evaluate_module, "image_sets", with_copies)
    monkeypatch.setattr(evaluate_module, "client_compute", lambda *_: {})  # its timing: most of this evaluate
    evaluate_module.evaluate(cfg)
    with h5py.File(tmp_path / "run/results.h5") as f:
        m = f["metrics"]
        for who in ("c0", "c1"):
            assert m[f"{who}/membership"].attrs["mia_client_auc"] == 1  # another client's members: about 0.5
            assert m[f"{who}/membership"].attrs["members"] == 6
            copies = m[f"{who}/client_alone"].attrs
            assert copies["copy_rate_pixel"] == copies["copy_rate_feature"] == 1  # against its test split: 0
            sent = audit_totals(f[f"clients/{who}"])["images_sent"]
            attack, releases = m[f"{who}/attack"].attrs, m[f"{who}/disclosure"].attrs["releases"]
            assert sent == 12 and releases == -(-sent // 6) == 2
            assert attack["releases"] == releases  # one release passed instead of k: 1
            assert attack["link_pixel_top1_releases_low"] <= attack["link_pixel_top1_releases"]
            assert attack["recon_own_ssim_releases"] <= attack["recon_own_ssim_releases_high"]
