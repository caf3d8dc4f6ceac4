"""The study's statistics (collafuse_hpc/report/stats.py) on inputs with known answers."""

from __future__ import annotations

import math
import warnings

import h5py
import numpy as np
import pytest
from scipy import stats

from collafuse_hpc.evaluation import metrics
from collafuse_hpc.report import tables as report
from collafuse_hpc.report.figures import _spread, fd_label, personalization
from collafuse_hpc.report.stats import (
    converged,
    loss_change,
    loss_change_noise,
    loss_curves,
    pooled_interval,
    pooled_share,
    seeds_half,
    versus_baseline,
)


def test_loss_change_tells_a_flat_tail_from_a_falling_one():
    rounds = np.arange(1000)
    assert loss_change(0.05 + np.exp(-rounds / 50)) < 0.001  # decayed long before the end
    assert loss_change(1 - rounds / 1000) == pytest.approx(1 / 9, rel=1e-3)  # still falling at a constant rate
    assert math.isnan(loss_change(np.ones(50)))


def test_a_scattered_flat_tail_is_converged_and_a_steady_fall_is_not():
    """The server's per-round loss scatters widely (each round draws its own steps): two
    windows' means of a flat tail then differ by more than CONVERGED by chance alone."""
    rounds = np.arange(800)
    rng = np.random.default_rng(0)
    flat = 0.1 + 0.2 * np.exp(-rounds / 60) + rng.normal(0, 0.03, 800)
    flat[-80:] -= 0.006  # a chance dip of the last window: about 3% of the whole fall
    assert loss_change(flat) > 0.02 and loss_change_noise(flat) > loss_change(flat) and converged(flat)
    smooth = 0.1 + 0.2 * np.exp(-rounds / 60) + rng.normal(0, 0.0005, 800)
    assert loss_change_noise(smooth) < 0.02 and converged(smooth)
    falling = 0.3 - 0.2 * rounds / 800 + rng.normal(0, 0.03, 800)  # scattered too, but falls steadily
    assert loss_change(falling) > loss_change_noise(falling) and not converged(falling)


def test_loss_curves_average_the_clients_that_trained_and_leave_out_a_c0_run_s(tmp_path):
    """Partial participation: a round's mean is over the clients that trained in it. At
    c = 0 no client trains: no clients' curve, and no warning of an empty mean."""
    nan = math.nan
    for name, c0, c1 in (("mixed", [1.0, nan, 3.0], [3.0, nan, nan]), ("c0", [nan] * 3, [nan] * 3)):
        with h5py.File(tmp_path / f"{name}.h5", "w") as f:
            for who, loss in (("c0", c0), ("c1", c1)):
                f[f"clients/{who}/rounds/loss_local"], f[f"clients/{who}/rounds/round"] = loss, [0, 1, 2]
            f["server/rounds/loss_server"], f["server/rounds/round"] = [0.5, 0.4, 0.3], [0, 1, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mixed, c0 = loss_curves(str(tmp_path / "mixed.h5")), loss_curves(str(tmp_path / "c0.h5"))
    np.testing.assert_equal(mixed["clients"], [2.0, nan, 3.0])
    assert "clients" not in c0 and list(c0["server"]) == [0.5, 0.4, 0.3]


def _run(c: float, seed: int, fidelity: float, fid: float, half: float = 0.01) -> dict:
    row = {"method": "split", "split": "markov", "partition": "class", "share": "off", "c": c, "seed": seed}
    row["who"] = "pooled"
    row |= {"fidelity": fidelity, "fidelity_low": fidelity - half, "fidelity_high": fidelity + half}
    row |= {"fid_collaborative": fid, "fid_collaborative_low": fid - half, "fid_collaborative_high": fid + half}
    return row | {key: math.nan for key in ("precision", "recall", "class_distance", *report.COPIES)}


def test_versus_baseline_pairs_seeds_and_gives_t_intervals_and_verdicts():
    table = [_run(1, s, 0.8, 5.0) for s in range(3)]
    table += [_run(0.2, s, f, 9.0 + s) for s, f in enumerate((0.30, 0.35, 0.40))]  # worse fidelity, worse FD
    table += [_run(0.6, s, f, 5.0 + d) for s, (f, d) in enumerate(((0.90, -1), (0.95, 1), (0.92, 0)))]
    got = {(r["c"], r["metric"]): r for r in versus_baseline(table)}
    low = got[(0.2, "class fidelity")]
    half = stats.t.ppf(0.975, 2) * 0.05 / math.sqrt(3)  # sd of (-0.5, -0.45, -0.4) is 0.05
    assert low["delta"] == pytest.approx(-0.45) and low["high"] == pytest.approx(-0.45 + half)
    assert low["verdict"] == "loses" and low["interval"] == "seeds" and low["seeds"] == 3
    assert got[(0.2, "FD")]["verdict"] == "loses"  # lower is better: +4 +- ...
    assert got[(0.6, "class fidelity")]["verdict"] == "wins"
    assert got[(0.6, "FD")]["verdict"] == "ties"  # -1, +1, 0 around 0
    assert (0.6, "precision") not in got  # NaN: not scored, not compared


def test_versus_baseline_with_one_seed_uses_the_intervals_over_images():
    table = [_run(1, 0, 0.8, 5.0, half=0.03), _run(0.2, 0, 0.75, 5.0, half=0.04)]
    got = {r["metric"]: r for r in versus_baseline(table)}
    fidelity = got["class fidelity"]
    assert fidelity["interval"] == "images" and fidelity["low"] == pytest.approx(-0.05 - 0.05)  # hypot(0.03, 0.04)
    assert fidelity["verdict"] == "ties"


def test_versus_baseline_over_few_seeds_is_never_narrower_than_the_images_allow():
    """Two seeds whose differences happen to agree give a zero-width t-interval; each
    difference still carries its images' sampling noise, which then sets the width."""
    table = [_run(1, s, 0.8, 5.0, half=0.03) for s in range(2)]
    table += [_run(0.2, s, 0.75, 5.0 + s, half=0.04) for s in range(2)]
    got = {r["metric"]: r for r in versus_baseline(table)}
    fidelity = got["class fidelity"]  # -0.05 in both seeds
    floor = math.sqrt(2 * 0.05**2) / 2  # two differences of half-width hypot(0.03, 0.04) = 0.05, averaged
    assert fidelity["interval"] == "seeds (images floor)"
    assert fidelity["low"] == pytest.approx(-0.05 - floor) and fidelity["high"] == pytest.approx(-0.05 + floor)
    fd = got["FD"]  # +0 and +1: the spread over seeds is the wider
    assert fd["interval"] == "seeds" and fd["high"] - fd["delta"] == pytest.approx(stats.t.ppf(0.975, 1) * 0.5)


def test_a_rows_interval_over_several_seeds_is_the_t_interval_never_narrower_than_the_images(tmp_path):
    """table.csv's ``_low``/``_high`` of a point run with several seeds follow the rule the
    versus_c1 differences do: the t-interval over the seeds (not each run's interval over
    images averaged, which leaves out the spread between seeds), floored by the images'
    noise of the mean, clipped to the figure's range; one seed keeps its own; none where
    it cannot be told (one scored seed of three, an infinite PSNR)."""

    def run(c: float, seed: int, fidelity: float, fid: float, half: float, **more: float) -> dict:
        row = {key: math.nan for key in report.COLUMNS} | _run(c, seed, fidelity, fid, half)
        return row | {"features": "classifier"} | more

    fidelities, fds = (0.1, 0.2, 0.3), (0.2, 0.3, 2.0)
    table = [run(0.4, s, f, 5.0, 0.3, precision=p) for s, (f, p) in enumerate(zip(fidelities, (0.9, 1.0, 1.0)))]
    table += [run(0.6, s, 0.95, d, 0.05, recall=math.nan if s else 0.5, recon_public_psnr_db=math.inf)
              for s, d in enumerate(fds)]  # fmt: skip
    table += [run(0.2, 0, 0.5, 4.0, 0.05)]
    got = {r["c"]: r for r in report.aggregate(table)}
    t = stats.t.ppf(0.975, 2) / math.sqrt(3)  # 4.30 / sqrt(3) = 2.48 sd
    spread = t * 0.1  # sd of (0.1, 0.2, 0.3)
    assert got[0.4]["fidelity_low"] == 0.0 and got[0.4]["fidelity_high"] == pytest.approx(0.2 + spread)  # clipped
    floor = math.sqrt(3 * 0.3**2) / 3  # the seeds agree on FD 5.0: the images' noise of the mean sets the width
    fd = got[0.4]["fid_collaborative_low"], got[0.4]["fid_collaborative_high"]
    assert fd == pytest.approx((5 - floor, 5 + floor))
    assert got[0.4]["precision_high"] == 1.0  # a share's interval ends at 1
    assert got[0.6]["fid_collaborative_low"] == 0.0  # an FD's at 0
    assert got[0.6]["fid_collaborative_high"] == pytest.approx(np.mean(fds) + t * np.std(fds, ddof=1))
    assert all(math.isnan(got[0.6][k]) for k in ("recall_low", "recall_high", "recon_public_psnr_db_low"))
    assert (got[0.2]["fidelity_low"], got[0.2]["fidelity_high"]) == pytest.approx((0.45, 0.55))  # one seed: its own
    # the same rule as the paired differences: against a c = 1 without spread, the same half-width
    base = [run(1, s, 0.0, 0.0, 0.0) for s in range(3)]
    delta = next(v for v in versus_baseline(base + table[:3]) if v["metric"] == "class fidelity")
    assert delta["high"] - delta["delta"] == pytest.approx(spread)
    md = report.write_tables(report.aggregate(table), [], str(tmp_path), [], "")
    assert f"0.2 [0, {0.2 + spread:.4g}]" in md and "t-interval over the seeds" in md
    assert "| 0.5 (1 of 3 seeds) |" in md  # c = 0.6's recall: not read as a three-seed mean
    assert md.count("(1 of 3 seeds)") == md.count("| 0.5 (1 of 3 seeds) |")  # nothing else: not c, not a count
    # a seed without an interval over images leaves the others' floor: two agreeing seeds get no zero width
    assert seeds_half([0.5, 0.5], [0.1, math.nan]) == (pytest.approx(0.05), "seeds (images floor)")
    # the figures' error bars are the same interval; without one, the std over seeds
    assert _spread(got[0.4], "fidelity") == pytest.approx((0.2, spread))
    assert _spread(got[0.6], "recon_public_psnr_db") == (0.0, 0.0)  # inf: neither


def test_the_c1_baseline_stands_beside_the_shares_its_partition_was_run_with():
    """c = 1 sends no labels, so one run serves both shares, but only where that
    partition has runs with labels shared: no lone "shared" condition of one point."""

    def row(partition: str, share: str, c: float) -> dict:
        keys = {"method": "split", "split": "markov", "partition": partition, "share": share, "c": c, "who": "pooled"}
        return {key: math.nan for key in report.COLUMNS} | keys | {"seed": 0, "features": "classifier"}

    table = [row("class", "off", 1), row("class", "off", 0.2), row("class", "on", 0.2)]
    table += [row("iid", "off", 1), row("iid", "off", 0.2)]
    got = sorted((r["partition"], r["share"], r["c"]) for r in report.aggregate(table))
    assert got == [("class", "off", 0.2), ("class", "off", 1), ("class", "on", 0.2), ("class", "on", 1)] + [
        ("iid", "off", 0.2),
        ("iid", "off", 1),
    ]


def test_the_figure_shows_personalization_as_class_distance_only_when_every_run_has_it():
    iid = {"fidelity": 1.0, "class_distance": 0.11}  # fidelity 1.00 for every iid run: it cannot separate them
    older = {"fidelity": 0.34, "class_distance": math.nan}  # evaluated before the class distance existed
    assert personalization([iid, dict(iid, class_distance=0.26)])[0] == "class_distance"
    assert personalization([iid, older]) == ("fidelity", "class fidelity (higher is better)")
    assert personalization([{"fidelity": 0.9}])[0] == "fidelity"


def _summary(clients: dict[str, dict]) -> dict:
    """A results summary (inspection.summarize's shape) of one evaluated run whose clients'
    collaborative sets scored ``clients[who]`` (class_fidelity, its _low and _high, ...)."""
    disclosure = {"t_c": 40, "snr": 1.0, "psnr_db": 10.0, "ssim": 0.1, "mu_composed": 9.0}
    compute = {key: 1.0 for key in ("sampling_flops_client", "sampling_flops_full", "train_flops_client")}
    compute |= {key: 1.0 for key in ("train_flops_full", "sampling_time_ratio", "sampling_ideal_ratio")}
    metrics = {who: {"collaborative": q, "disclosure": disclosure, "compute": compute | {"train_time_ratio": 1.0}}
               for who, q in clients.items()}  # fmt: skip
    metrics |= {"attrs": {"partition": "class", "extractor": "classifier"}, "pooled": {"collaborative": {}}}
    config = {"diffusion": {"split": "markov"}, "clients": [{"cut_ratio": 0.2}] * len(clients)}
    return {"metrics": metrics, "roles": {}, "config": config | {"run": {"seed": 0, "rounds": 10}}}


def test_a_fine_tuned_federated_runs_collaborative_set_is_labelled_fine_tuned_with_or_without_its_global():
    """The collaborative set of a FedAvg run with finetune_steps > 0 is its fine-tuned
    clients' samples (fedavg+ft), whether or not the global model was scored beside it: it
    was reported as the global model's (fedavg) when eval.sets had no global."""
    curves = {"rounds": np.arange(10), "clients": np.ones(10)}

    def labels(finetune_steps: int, scored: tuple[str, ...]) -> set[str]:
        summary = _summary({"c0": {"class_fidelity": 0.7}})
        summary["config"]["run"] |= {"method": "federated"}
        summary["config"]["federated"] = {"local_steps": 2, "finetune_steps": finetune_steps}
        for who in ("c0", "pooled"):
            summary["metrics"][who] |= {name: {"fid": 1.0} for name in scored}
        return {r["method"] for r in report.rows(summary, curves)}

    assert labels(100, ("collaborative",)) == {"fedavg+ft"}
    assert labels(100, ("collaborative", "global")) == {"fedavg", "fedavg+ft"}
    assert labels(0, ("collaborative",)) == labels(0, ("collaborative", "global")) == {"fedavg"}


def test_pooled_class_intervals_are_the_clients_in_quadrature_as_the_bootstrap_of_the_mean():
    """The pooled class fidelity is the mean over K clients, so its half-width is
    sqrt(sum h_k^2) / K (0.0147 for four clients of 0.0293), not the mean of the bounds
    (0.0293): checked against bootstrapping the mean over each client's own images."""
    rng = np.random.default_rng(0)
    hits = [(rng.random(400) < p).astype(float) for p in (0.80, 0.85, 0.9, 0.95)]  # per image: in a held class
    clients = {}
    for k, h in enumerate(hits):
        low, high = metrics.bootstrap_interval(np.mean, (h,), resamples=2000, seed=k, bounds=(0.0, 1.0))
        clients[f"c{k}"] = {"class_fidelity": h.mean(), "class_fidelity_low": low, "class_fidelity_high": high}
    means = [np.mean([h[rng.integers(0, len(h), len(h))].mean() for h in hits]) for _ in range(2000)]
    bootstrap = 1.96 * np.std(means, ddof=1)
    pooled = report.rows(_summary(clients), {"rounds": np.arange(10), "clients": np.ones(10)})[0]
    assert pooled["who"] == "pooled" and pooled["fidelity"] == pytest.approx(np.mean([h.mean() for h in hits]))
    assert (pooled["fidelity_high"] - pooled["fidelity_low"]) / 2 == pytest.approx(bootstrap, rel=0.1)
    assert pooled_interval([0.5] * 4, [0.5 - 0.0293] * 4, [0.5 + 0.0293] * 4)[2] == pytest.approx(0.5 + 0.01465)
    clipped = pooled_interval([0.99, 0.5], [0.95, 0.45], [1.0, 0.55])  # the wider side of a clipped interval
    assert clipped[2] - clipped[0] == pytest.approx(math.hypot(0.04, 0.05) / 2)
    assert math.isnan(pooled_interval([0.5, 0.6], [0.4, math.nan], [0.6, math.nan])[1])  # one without: none


def test_a_pooled_linkage_rate_is_wilson_s_over_every_client_s_probes():
    """A linkage rate is a share of independent probes, so its pooled interval is the Wilson
    interval of every client's probes together (c = 0.8 of the study: 5 of 1,437 linked,
    [0.0015, 0.0081]), not the clients' Wilson intervals in quadrature, which take each
    as symmetric about its wide upper side and reach 0 where hits were seen."""
    trials, hits = [288, 288, 290, 288, 283], [0, 0, 4, 0, 1]
    shares = [h / n for h, n in zip(hits, trials, strict=True)]
    lows, highs = zip(*(metrics.share_interval(h, n) for h, n in zip(hits, trials, strict=True)))
    share, low, high = pooled_share(shares, list(lows), trials)
    wilson = stats.binomtest(5, 1437).proportion_ci(0.95, "wilson")
    assert share == pytest.approx(5 / 1437) and (low, high) == pytest.approx((wilson.low, wilson.high), abs=1e-6)
    assert low > 0 == pooled_interval(shares, list(lows), list(highs))[1]  # quadrature's reaches 0
    assert math.isnan(pooled_share(shares, [math.nan, *lows[1:]], trials)[1])  # one without an interval: none
    assert pooled_share([0.5, math.nan], [0.4, math.nan], [10, math.nan])[0] == 0.5  # a client without one: left out


def test_the_convergence_windows_are_rounds_not_rows(tmp_path):
    """A server logs no row in a round no client sent to (or in rows a crash lost): the
    windows are the first and last 10% of rounds, whichever rows they hold."""
    rounds = np.arange(1000)
    logged = rounds[(rounds % 2 == 0) | (rounds >= 500)]  # idle every other round in the first half
    with h5py.File(tmp_path / "run.h5", "w") as f:
        f["clients/c0/rounds/loss_local"], f["clients/c0/rounds/round"] = 1 - rounds / 1000, rounds
        f["server/rounds/loss_server"], f["server/rounds/round"] = 1 - logged / 1000, logged
    curves = loss_curves(str(tmp_path / "run.h5"))
    assert loss_change(curves["server"]) == pytest.approx(loss_change(curves["clients"]), rel=1e-3)
    assert loss_change(curves["server"]) == pytest.approx(1 / 9, rel=1e-2)


def test_c0_and_c1_stand_only_beside_the_split_modes_their_partition_was_run_with():
    """The class partition ran both split modes, iid only the Markov one: no lone
    'reference, iid' condition of its c = 0 and 1 runs in the table or the figures."""

    def row(split: str, partition: str, c: float, features: str) -> dict:
        keys = {"method": "split", "split": split, "partition": partition, "share": "off", "c": c, "who": "pooled"}
        return {key: math.nan for key in report.COLUMNS} | keys | {"seed": 0, "features": features}

    table = [row(s, "class", c, "classifier-a") for s, c in (("markov", 0), ("markov", 1), ("markov", 0.2))]
    table += [row("reference", "class", 0.2, "classifier-a")]
    table += [row("markov", "iid", c, "classifier-b") for c in (0, 0.2, 1)]
    got = sorted((r["split"], r["partition"], r["c"]) for r in report.aggregate(table))
    assert got == [("markov", "class", c) for c in (0, 0.2, 1)] + [("markov", "iid", c) for c in (0, 0.2, 1)] + [
        ("reference", "class", c) for c in (0, 0.2, 1)
    ]
    alone = [row("reference", "dirichlet", 1, "classifier-c")]  # only c = 1: under its own split
    assert [(r["split"], r["c"]) for r in report.aggregate(alone)] == [("reference", 1)]
    assert fd_label(table[:4]) == "FD (classifier features)"  # the README figure's was cut at 40 characters
    for r in table[:4]:
        r["features"] = "classifier-0078258180f-test-accuracy-0.9923"
    assert fd_label(table[:4]) == "FD (classifier features)"
    assert "each partition's own features" in fd_label(table)


def test_federated_runs_are_points_of_their_own_compared_with_each_client_alone():
    """A FedAvg run (c "-", no split, no shared labels) is paired with the c = 1 run of
    its partition and seed like a split point, and stands in the tables as its own
    method: the c = 1 baseline is not copied under its "-" share."""
    fed = [
        _run("-", seed, 0.9 + 0.01 * seed, 30.0) | {"method": "fedavg", "split": "-", "share": "-"} for seed in (0, 1)
    ]
    alone = [_run(1, seed, 0.8, 40.0) for seed in (0, 1)]
    got = {r["metric"]: r for r in versus_baseline(fed + alone)}
    assert got["class fidelity"]["method"] == "fedavg" and got["class fidelity"]["seeds"] == 2
    assert got["class fidelity"]["delta"] == pytest.approx(0.105) and got["class fidelity"]["verdict"] == "wins"
    assert got["FD"]["delta"] == pytest.approx(-10.0) and got["FD"]["verdict"] == "wins"
    table = [{key: math.nan for key in report.COLUMNS} | r | {"features": "classifier"} for r in fed + alone]
    got = sorted((r["method"], r["share"], r["c"], r["seeds"]) for r in report.aggregate(table))
    assert got == [("fedavg", "-", "-", 2), ("split", "off", 1, 2)]


def test_a_federated_runs_rounds_count_by_their_local_steps_for_convergence():
    """80 FedAvg rounds of 10 local steps are 800 steps: the rule judges them (a window of 8
    rounds holds 80 steps' losses), where 80 one-step rounds are too few."""
    flat = 0.05 + np.exp(-np.arange(80) / 5)
    assert math.isnan(loss_change(flat)) and loss_change(flat, steps=10) < 0.001
    assert converged(flat, steps=10)


def test_the_methods_figure_names_every_method_whichever_panel_shows_it(tmp_path, monkeypatch):
    """A point is drawn where its cost is above 0 on the log axes: with eval.compute false
    (no FLOPs) or at c = 0 (no client training) a method shows in the bytes panel only,
    and the legend, drawn from the first panel alone, left it unnamed."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    from collafuse_hpc.report.figures import methods_figure

    def row(method: str, c, flops: float, sent: float) -> dict:
        costs = {"train_flops_run": flops, "sampling_flops_image": flops, "bytes_run": sent}
        return {"who": "pooled", "method": method, "c": c, "split": "markov", "partition": "class", "seeds": 1,
                "fidelity": 0.5, "class_distance": 0.3, **costs}  # fmt: skip

    shown = []
    monkeypatch.setattr(plt, "close", lambda fig: shown.append(fig))  # keep the figure to read its legend
    table = [row("fedavg", "-", math.nan, 1e8), row("split", 0.2, math.nan, 2e7), row("split", 0.0, 0.0, 2e7)]
    assert methods_figure(table, str(tmp_path / "methods.png"))
    (legend,) = [axis.get_legend() for axis in shown[0].axes if axis.get_legend()]
    assert [t.get_text() for t in legend.get_texts()] == ["fedavg", "split c = 0.2 (markov)", "centralized (c = 0)"]
    # several partitions: a row of panels each, titled by it, a method in one colour in every row
    other = [{**r, "partition": "iid"} for r in table[:2]] + [{**row("fedavg+ft", "-", 1e12, 1e8), "partition": "iid"}]
    assert methods_figure(table + other, str(tmp_path / "methods2.png"))
    figure = shown[1]
    assert len(figure.axes) == 6 and figure.axes[3].get_title().endswith("(iid)")
    legends = [axis.get_legend() for axis in figure.axes if axis.get_legend()]
    assert [sorted(t.get_text() for t in legend.get_texts()) for legend in legends] == [
        ["centralized (c = 0)", "fedavg", "split c = 0.2 (markov)"],
        ["fedavg", "fedavg+ft", "split c = 0.2 (markov)"],
    ]
    markers = {c.get_label(): c.lines[0].get_marker() for axis in figure.axes[3:] for c in axis.containers}
    assert markers["fedavg"] == "s" and markers["fedavg+ft"] == "D"  # the global model and the fine-tuned apart
    colour = [{t.get_text(): to_hex(h.get_color()) for t, h in zip(g.get_texts(), g.legend_handles)} for g in legends]
    assert colour[0]["fedavg"] == colour[1]["fedavg"] != colour[0]["split c = 0.2 (markov)"]


def test_the_methods_figure_tells_labels_shared_from_labels_kept(tmp_path, monkeypatch):
    """Split runs at one c with labels kept and with labels shared are two methods: they
    had one name, colour and marker, so the figure drew them as one. Alone sends no labels
    and is one point whichever share aggregate() stood it beside."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    from collafuse_hpc.report.figures import method_label, methods_figure

    def row(method: str, c, share: str, distance: float) -> dict:
        return {"who": "pooled", "method": method, "c": c, "split": "markov" if method == "split" else "-",
                "partition": "class", "share": share, "seeds": 1, "fidelity": 0.5, "class_distance": distance,
                "train_flops_run": 1e12, "sampling_flops_image": 1e9, "bytes_run": 1e8}  # fmt: skip

    table = [row("fedavg", "-", "-", 0.3), row("split", 0.2, "off", 0.1), row("split", 0.2, "on", 0.2)]
    table += [row("split", 1, "off", 0.4), row("split", 1, "on", 0.4)]
    assert [method_label(r) for r in table[1:3]] == ["split c = 0.2 (markov)", "split c = 0.2 (markov, labels shared)"]
    shown = []
    monkeypatch.setattr(plt, "close", lambda fig: shown.append(fig))
    assert methods_figure(table, str(tmp_path / "methods.png"))
    (legend,) = [axis.get_legend() for axis in shown[0].axes if axis.get_legend()]
    names = [t.get_text() for t in legend.get_texts()]
    split = ["split c = 0.2 (markov)", "split c = 0.2 (markov, labels shared)"]
    assert sorted(names) == ["alone (c = 1)", "fedavg", *split]
    colours = {t.get_text(): to_hex(h.get_color()) for t, h in zip(legend.get_texts(), legend.legend_handles)}
    assert len(set(colours.values())) == 4
    assert len(shown[0].axes[0].containers) == 4  # alone once, not once per share


def test_a_log_axis_within_one_decade_is_labelled_at_its_points(tmp_path, monkeypatch):
    """Methods whose costs lie within a tenth of a decade (FedAvg variants' sampling
    FLOPs): matplotlib labelled every minor tick, and the labels ran into each other."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from collafuse_hpc.report.figures import methods_figure

    def row(method: str, flops: float) -> dict:
        return {"who": "pooled", "method": method, "c": "-", "split": "-", "partition": "class", "share": "-",
                "seeds": 1, "fidelity": 0.5, "class_distance": 0.2, "train_flops_run": flops,
                "sampling_flops_image": flops, "bytes_run": flops}  # fmt: skip

    shown = []
    monkeypatch.setattr(plt, "close", lambda fig: shown.append(fig))
    assert methods_figure(
        [row("fedavg", 7.7e8), row("fedavg+ft", 7.75e8), row("fedavg-cond", 8.6e8)], str(tmp_path / "m.png")
    )
    for axis in shown[0].axes:
        assert [t.get_text() for t in axis.get_xticklabels()] == ["7.7e+08", "8.6e+08"]
        assert not [t.get_text() for t in axis.get_xticklabels(minor=True) if t.get_text()]
    shown.clear()  # points 20% of the axis apart whose labels round alike: one label, not two
    assert methods_figure(
        [row("fedavg", 1.00e9), row("fedavg+ft", 1.04e9), row("fedavg-cond", 1.1e9)], str(tmp_path / "n.png")
    )
    assert [t.get_text() for t in shown[0].axes[0].get_xticklabels()] == ["1e+09", "1.1e+09"]


def test_the_loss_figure_of_runs_where_one_side_never_trains_names_them_without_a_warning(tmp_path, monkeypatch):
    """A report of centralized runs only (c = 0: no client trains) drew an empty clients'
    panel, put the legend there and printed matplotlib's "No artists with labels" warning
    to the user; beside runs with clients, a c = 0 run was missing from the legend, which
    named the clients' panel's runs only. The legend names every run, and an empty panel
    says why."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from collafuse_hpc.report.figures import loss_figure

    shown = []
    monkeypatch.setattr(plt, "close", lambda fig: shown.append(fig))
    rounds = np.arange(1, 51)
    server = {"server_rounds": rounds, "server": 1 / rounds}
    local = {"rounds": rounds, "clients": 1 / rounds}
    assert not loss_figure({"no-loss-logged": {}}, str(tmp_path / "none.png"))  # no figure of nothing
    study = {f"c{c}-s{seed}": local | server for c in range(27) for seed in range(3)}  # a study's 81 runs
    for curves in ({"c0-s0": server}, {"c1-s0": local}, {"c0-s0": server, "c1-s0": local, "c1-s1": local}, study):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # 81 runs: "Tight layout not applied", the legend ran off the figure
            assert loss_figure(curves, str(tmp_path / "loss.png"))
        clients, servers = shown[-1].axes
        (legend,) = shown[-1].legends
        assert [t.get_text() for t in legend.get_texts()] == sorted(curves)
        styles = [(line.get_color(), line.get_linestyle()) for line in clients.lines]
        assert len(set(styles[:40])) == min(40, len(styles))  # 27 runs had shared 10 colours on 2 line styles
        saved = plt.imread(tmp_path / "loss.png")  # the image holds the legend beside the panels
        assert saved.shape[1] > shown[-1].get_figwidth() * 110
        notes = [t.get_text() for axis in (clients, servers) for t in axis.texts]
        assert notes == ["no client trains (c = 0)"] * ("c1-s0" not in curves) + [
            "no server trains (c = 1, federated)"
        ] * ("c0-s0" not in curves)
