"""How alike a generated set is to a client's real test images: FID and KID, and with
the domain classifier's features precision, recall, class fidelity and class distance,
each with its 95% bootstrap interval over images (the formulas are in metrics.py)."""

from __future__ import annotations

import numpy as np

from collafuse_hpc.config import Config
from collafuse_hpc.evaluation import metrics
from collafuse_hpc.evaluation.classifier import Classifier
from collafuse_hpc.roles.client import Client

# said wherever a pooled FID is printed beside the clients': it is lower than each of theirs
POOLED_FID = (
    "pooled: every client's images against all their real images. FID falls as the number of images "
    "grows (its bias shrinks as 1/n), so the pooled FID, over K clients' images, sits below each "
    "client's own without the samples being better: compare FIDs of equal image counts"
)


def quality(real: np.ndarray, fake: np.ndarray, cfg: Config) -> dict:
    """FID and KID of ``fake`` against ``real`` features; with a classifier's features also
    precision and recall, and 95% bootstrap intervals over images (``eval.bootstrap``)."""
    k_mean, k_std = metrics.kid(real, fake, cfg.eval.kid_subsets, cfg.eval.kid_subset_size, cfg.run.seed)
    out = {"fid": metrics.fid(real, fake), "kid_mean": k_mean, "kid_std": k_std}
    if cfg.eval.extractor != "classifier":
        return out
    if not cfg.eval.bootstrap:
        out["precision"], out["recall"] = metrics.precision_recall(real, fake)
        return out
    resamples, seed = cfg.eval.bootstrap, cfg.run.seed
    out["fid_low"], out["fid_high"] = metrics.bootstrap_interval(metrics.fid, (real, fake), resamples, seed)
    estimate, intervals = metrics.precision_recall_bootstrap(real, fake, resamples=resamples, seed=seed)
    out["precision"], out["recall"] = estimate
    for name, (low, high) in zip(("precision", "recall"), intervals):
        out[f"{name}_low"], out[f"{name}_high"] = low, high
    return out


def label_counts(client: Client, classes: int) -> np.ndarray:
    """Images per class in a client's train split, [classes] (ValueError for a shard
    without labels)."""
    labels = client.reader.labels()
    if labels is None:
        raise ValueError(
            f"client {client.id!r}: its shard has no labels, so class fidelity cannot be scored; "
            "use eval.extractor inception or pixels for unlabelled data"
        )
    return np.bincount(labels, minlength=classes)


def fidelity(scorer: Classifier, images: np.ndarray, own: np.ndarray, cfg: Config) -> dict:
    """For uint8 ``images`` of a client whose train labels count ``own`` per class: class
    fidelity (share in the classes it holds), class distance (total variation to its
    label mix), each with its bootstrap interval over images, and mean confidence."""
    probabilities = scorer.probabilities(images)
    held = set(np.flatnonzero(own).tolist())
    scores = {
        "class_fidelity": lambda p: metrics.class_fidelity(p, held)[0],
        "class_distance": lambda p: metrics.class_distance(p, own),
    }
    out = {name: score(probabilities) for name, score in scores.items()}
    out["confidence"] = metrics.class_fidelity(probabilities, held)[1]
    for name, score in scores.items() if cfg.eval.bootstrap else ():
        low, high = metrics.bootstrap_interval(score, (probabilities,), cfg.eval.bootstrap, cfg.run.seed, (0.0, 1.0))
        out.update({f"{name}_low": low, f"{name}_high": high})
    return out
