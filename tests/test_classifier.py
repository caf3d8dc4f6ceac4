"""The domain classifier and the metrics it enables, first on cases with a known answer
(real against real, known classes, disjoint sets), then inside ``evaluate``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bench_eval import resampled_intervals as _resampled  # the route before: every resample recomputed
from conftest import tiny_config

from collafuse_hpc.cli import main
from collafuse_hpc.config import from_dict
from collafuse_hpc.data import ShardReader
from collafuse_hpc.evaluation import metrics
from collafuse_hpc.evaluation.classifier import Classifier, train_classifier
from collafuse_hpc.evaluation.evaluate import evaluate
from collafuse_hpc.evaluation.features import features
from collafuse_hpc.runtime.run import run_in_process

# The tests that read the classifier run on one xdist worker, which trains it once (2.6 s of
# CPU, up to 10 s on busy cores), not once on each worker they would otherwise spread over.
CLASSIFIER = pytest.mark.xdist_group("classifier")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, shards) -> str:
    """digits.pt, trained once for the CLASSIFIER tests."""
    path = str(tmp_path_factory.mktemp("classifier") / "digits.pt")
    meta = train_classifier(shards, path, epochs=8, seed=0)
    assert meta["accuracy"] > 0.85 and meta["num_classes"] == 10, meta
    return path


def _images(shard: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    reader = ShardReader(shard, split)
    images, labels = reader.read(np.arange(len(reader)))
    return images, labels


def test_precision_and_recall_on_known_answers():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    precision, recall = metrics.precision_recall(a, b)
    assert precision > 0.8 and recall > 0.8  # the same distribution
    assert metrics.precision_recall(a, b + 50) == (0.0, 0.0)  # disjoint sets
    two_modes = np.concatenate([a[:200], a[200:] + 20])
    precision, recall = metrics.precision_recall(two_modes, b)  # all samples in one of the two real modes
    assert precision > 0.8 and 0.4 < recall < 0.6


def test_class_fidelity_and_bootstrap_on_known_answers():
    probabilities = np.eye(4)[[0, 0, 1, 3]] * 0.9 + 0.025
    assert metrics.class_fidelity(probabilities, {0, 1}) == (0.75, pytest.approx(0.925))
    # class distance: predicted classes 0, 0, 1, 3 against a label mix
    assert metrics.class_distance(probabilities, np.array([2, 1, 0, 1])) == 0  # the same proportions
    assert metrics.class_distance(probabilities, np.array([0, 0, 7, 0])) == 1  # no class in common
    assert metrics.class_distance(probabilities, np.array([1, 1, 0, 0])) == pytest.approx(0.25)  # 1/4 misplaced
    uniform = np.eye(10)[np.arange(1000) % 10]  # all ten classes evenly, against a client of two
    assert metrics.class_distance(uniform, np.array([50, 50] + [0] * 8)) == pytest.approx(0.8)
    rng = np.random.default_rng(1)
    x = rng.normal(size=400)
    low, high = metrics.bootstrap_interval(np.mean, (x,), resamples=300)
    assert low < x.mean() < high and high - low == pytest.approx(2 * 1.96 / np.sqrt(400), rel=0.25)


@CLASSIFIER
def test_the_classifier_sees_digits_where_real_and_real_agree_and_other_classes_do_not(classifier, shards):
    """Known answers on real digits: c0's test images against its own train images are
    close in the classifier's features and far from c1's; they fall in c0's classes."""
    scorer = Classifier(classifier, torch.device("cpu"))
    test0, labels0 = _images(shards[0], "test")
    train0, _ = _images(shards[0], "train")
    test1, _ = _images(shards[1], "test")
    f_test0, f_train0, f_test1 = (features(scorer.features, x, 64, torch.device("cpu")) for x in (test0, train0, test1))
    same, other = metrics.fid(f_train0, f_test0), metrics.fid(f_test1, f_test0)
    assert other > 10 * same, (same, other)
    held0 = set(labels0.tolist())
    fidelity, confidence = metrics.class_fidelity(scorer.probabilities(test0), held0)
    assert fidelity > 0.9 and confidence > 0.7
    assert metrics.class_fidelity(scorer.probabilities(test1), held0)[0] < 0.15
    mix0 = np.bincount(_images(shards[0], "train")[1], minlength=10)
    assert metrics.class_distance(scorer.probabilities(test0), mix0) < 0.15  # its own test images: its mix
    assert metrics.class_distance(scorer.probabilities(test1), mix0) > 0.85  # another client's classes
    precision, recall = metrics.precision_recall(f_train0, f_test0)
    assert precision > 0.7 and recall > 0.7
    assert max(metrics.precision_recall(f_test1, f_test0)) < 0.3


def _radii(x: np.ndarray, k: int) -> np.ndarray:
    """Each row's distance to its k-th nearest other row, from the differences themselves."""
    return np.array([np.sort(np.linalg.norm(np.delete(x, i, 0) - x[i], axis=1))[k - 1] for i in range(len(x))])


def _brute_force_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkaanniemi et al.'s definition row by row."""

    def inside(points: np.ndarray, centres: np.ndarray) -> float:
        r = _radii(centres, k)
        return float(np.mean([(np.linalg.norm(centres - p, axis=1) <= r).any() for p in points]))

    return inside(fake, real), inside(real, fake)


@CLASSIFIER
def test_precision_and_recall_equal_the_definition_on_real_features(classifier, shards):
    """Real classifier features of c0's test images against its train images: every row's
    own distance, a round-off 1e-7 by |a|^2 + |b|^2 - 2ab, must not count as a neighbour."""
    scorer = Classifier(classifier, torch.device("cpu"))
    f_test, f_train = (
        features(scorer.features, _images(shards[0], split)[0], 64, torch.device("cpu")) for split in ("test", "train")
    )
    for k in (1, 3, 5):
        want = _brute_force_precision_recall(f_train, f_test, k)
        assert metrics.precision_recall(f_train, f_test, k) == pytest.approx(want, abs=1e-12), k
    exact = _radii(f_test, 3)
    np.testing.assert_allclose(metrics.knn_radii(f_test, 3), exact, rtol=1e-9)
    repeated = f_test[[0, 0, 0, *range(1, len(f_test))]]  # a bootstrap resample repeats rows: a row's copies
    np.testing.assert_allclose(metrics.knn_radii(repeated, 3)[:3], exact[0], rtol=1e-9)  # are not its neighbours
    for k in (1, 3):  # the intervals from one distance matrix are the resample-by-resample ones
        assert metrics.precision_recall_bootstrap(f_train, f_test, k, 50, 3) == _resampled(f_train, f_test, k, 50, 3)


def test_precision_recall_bootstrap_equals_recomputing_every_resample_copies_and_few_rows_included():
    """precision_recall_bootstrap reads every resample's distances and neighbours from the
    original sets; it must give exactly precision_recall's estimate and the intervals of
    recomputing each resample, with copies inside a set (not a row's neighbours), k near
    the set's size, and a row whose nearest kept neighbours a resample leaves out (keep=2:
    the full row is read then)."""
    rng = np.random.default_rng(3)
    for n, m, d, k in ((72, 500, 16, 3), (30, 40, 8, 1), (20, 25, 4, 5), (6, 5, 3, 3), (4, 3, 2, 5)):  # k clipped
        real, fake = rng.normal(size=(n, d)), 1.3 * rng.normal(size=(m, d))
        real[1:3], fake[3:10] = real[0], fake[2]
        assert metrics.precision_recall_bootstrap(real, fake, k, 60, 7) == _resampled(real, fake, k, 60, 7), (n, k)
    x = rng.normal(size=(40, 4))
    x[5:9] = x[4]
    near = metrics._Neighbours(x, 3, keep=2)
    for rows in metrics.resample_rows((x,), 30, 1):
        radii = near.radii(np.bincount(rows[0], minlength=len(x)))
        np.testing.assert_allclose(radii[rows[0]], metrics.knn_radii(x[rows[0]], 3), rtol=1e-12)
        assert (radii[np.setdiff1d(np.arange(len(x)), rows[0])] == -np.inf).all()  # a row not drawn has no ball


def test_a_full_resample_reads_each_rows_radius_from_its_kept_neighbours(monkeypatch):
    """_Neighbours keeps at least k neighbours a row: with fewer kept (keep=2, k=5) every
    row of every resample took the whole-row route, one distance computation per row."""
    x = np.random.default_rng(0).normal(size=(40, 4))
    near, expected = metrics._Neighbours(x, 5, keep=2), metrics.knn_radii(x, 5)

    def recomputed(*args):
        raise AssertionError("a full resample recomputed a row's distances")

    monkeypatch.setattr(metrics, "distances", recomputed)
    np.testing.assert_array_equal(near.radii(np.ones(len(x), np.int64)), expected)


def test_an_interval_from_fewer_than_two_resamples_is_refused_by_name():
    """One resample has no spread: the intervals read [0, 1] (a share) or (-inf, inf) (FID)
    without a word, and precision_recall_bootstrap with none raised an IndexError."""
    real, fake = np.random.default_rng(0).normal(size=(2, 20, 3))
    for resamples in (0, 1):
        with pytest.raises(ValueError, match=f"at least 2 resamples, got {resamples}"):
            metrics.precision_recall_bootstrap(real, fake, resamples=resamples)
        with pytest.raises(ValueError, match=f"at least 2 resamples, got {resamples}"):
            metrics.bootstrap_interval(metrics.fid, (real, fake), resamples)


@CLASSIFIER
@pytest.mark.slow
def test_evaluate_with_the_classifier_reports_fidelity_precision_recall_and_intervals(tmp_path, shards, classifier):
    raw = tiny_config(shards, tmp_path, [0.25, 1.0], rounds=2)
    raw["eval"].update(
        extractor="classifier", classifier_path=classifier, sets=["collaborative"], bootstrap=20, images=40
    )
    cfg = from_dict(raw)
    run_in_process(cfg, resume=False)
    report = evaluate(cfg)
    for who in ("c0", "c1"):
        got = report[who]["collaborative"]
        for key in ("fid", "class_fidelity", "class_distance", "confidence", "precision", "recall"):
            assert np.isfinite(got[key]), (who, key)
        for key in ("fid", "class_fidelity", "class_distance"):
            assert got[f"{key}_low"] <= got[key] <= got[f"{key}_high"], (who, key)
        real = report[who]["real"]  # the known answers, beside every run's numbers
        assert real["class_fidelity"] > 0.75 and real["class_distance"] < 0.25
    assert {"precision", "recall", "fid_low"} <= set(report["pooled"]["collaborative"])


@CLASSIFIER
def test_train_classifier_never_replaces_a_classifier_evaluations_used(classifier, shards, capsys):
    before = open(classifier, "rb").read()
    assert main(["train-classifier", *shards, "--out", classifier, "--epochs", "1"]) == 2
    assert "exists: evaluations already made with it" in capsys.readouterr().err
    assert open(classifier, "rb").read() == before


def test_a_missing_or_foreign_classifier_is_refused_before_sampling(tmp_path, shards, capsys):
    raw = tiny_config(shards, tmp_path, [0.25, 0.5], rounds=2)
    raw["eval"].update(extractor="classifier", classifier_path=str(tmp_path / "none.pt"))
    from conftest import write_config

    config = write_config(tmp_path / "run.yaml", raw)
    assert main(["evaluate", config]) == 2
    assert "classifier file" in capsys.readouterr().err
    (tmp_path / "none.pt").write_bytes(b"not a classifier")
    assert main(["evaluate", config]) == 2
    assert "cannot be read" in capsys.readouterr().err
