"""What x_c discloses about a client's images, scored per client for ``evaluate``: by
formula (SNR, PSNR, SSIM, the Gaussian-mechanism view; metrics.py) and by attack
(reconstruction and linkage by an adversary holding x_c; attacks.py)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from collafuse_hpc.data import to_model_range, to_uint8
from collafuse_hpc.evaluation import attacks, metrics
from collafuse_hpc.roles.client import Client

NOTHING_SENT = "nothing sent"  # the reading of a client at c = 1, whose x_c never leaves it
NO_X_C = "no x_c sent (federated: model updates only)"  # a federated client's


def _unsent(client: Client) -> str:
    """The reading of a client that sends no x_c: it sent other messages (a federated
    client's model updates), or nothing at all (c = 1)."""
    return NO_X_C if client.released["messages_sent"] else NOTHING_SENT


# the attack figures that depend on how many releases of each image the adversary averages (_figures)
FIGURES = (
    *(f"recon_{model}_{key}" for model in ("public", "own") for key in ("psnr_db", "ssim", "fid")),
    *(f"link_{space}_top{k}" for space in ("pixel", "feature") for k in (1, 5)),
)


def disclosure(client: Client, x0: torch.Tensor, x_c: torch.Tensor) -> dict:
    """Disclosure of x_c (as sent) about the real test images x0. The client sent
    ``released["images_sent"]`` training images, so each was released
    ceil(sent / train size) times. A client that sends nothing (c = 1) has no x_c: its
    MSE, PSNR and SSIM are NaN, and its reading says so."""
    t_c, released, sent = client.cut.t_c, client.released["images_sent"], client.cut.uses_server
    abar = float(client.diffusion.alphas_cumprod[t_c])
    dims = int(np.prod(x0.shape[1:]))
    releases = math.ceil(released / len(client.reader)) if released else 0
    mu = metrics.gdp_mu(dims, abar)
    composed = mu * math.sqrt(releases) if releases else 0.0
    return {
        "t_c": t_c,
        "snr": metrics.snr(abar),
        "mse": metrics.mse(x_c, x0) if sent else math.nan,
        "psnr_db": metrics.psnr(x_c, x0) if sent else math.nan,
        "ssim": metrics.ssim(x_c, x0) if sent else math.nan,
        "dims": dims,
        "mu_per_release": mu,
        "releases": releases,
        "mu_composed": composed,
        "reading": metrics.gdp_reading(composed if releases else mu) if sent else _unsent(client),
        "images": len(x0),
    }


def _public(client: Client, clients: list[Client]) -> Client | None:
    """The adversary's public denoiser: another client's model trained at t_c (and
    without labels), or None when no other client's model covers t_c."""
    return next((o for o in clients if o is not client and o.cut.t_c >= client.cut.t_c and not o.condition), None)


# a figure as a statistic of per-image arrays: (statistic, arrays, its range); statistic(*arrays) is
# its value, and its bootstrap interval resamples each array's rows (metrics.bootstrap_interval)
Figure = tuple[Callable[..., float], tuple[np.ndarray, ...], tuple[float, float]]


def _psnr(errors: np.ndarray) -> float:
    """PSNR in dB of images whose MSEs per pixel are ``errors`` [N]."""
    return metrics.psnr_of_mse(float(errors.mean()))


def _scored(figures: dict[str, Figure], resamples: int, seed: int) -> dict:
    """Each figure's value and, for ``resamples`` > 0, its 95% bootstrap interval
    ``<key>_low``/``<key>_high`` (seeded by ``seed``)."""
    out = {}
    for key, (statistic, arrays, bounds) in figures.items():
        out[key] = float(statistic(*arrays))
        if resamples:
            out[f"{key}_low"], out[f"{key}_high"] = metrics.bootstrap_interval(
                statistic, arrays, resamples, seed, bounds
            )
    return out


def _figures(
    client: Client,
    public: Client | None,
    x0: torch.Tensor,
    x_c: torch.Tensor,
    y: torch.Tensor | None,
    train: tuple[np.ndarray, np.ndarray | None, np.ndarray],
    probes: torch.Tensor,
    real: np.ndarray,
    feats: Callable[[np.ndarray], np.ndarray],
    releases: int,
    stream: torch.Generator | None,
) -> dict:
    """Reconstruction of the test images x0 [N, C, H, W] from ``x_c`` (the mean of
    ``releases`` releases of each) and linkage of ``probes`` (the mean of as many releases
    of each candidate) to the candidates ``train`` (uint8 images [M, C, H, W], their
    labels or None, their features [M, D]). A mean of k releases enters a denoiser as one
    release at k times the SNR (attacks.as_one_release, noise from ``stream``).

    Each figure has its 95% interval over images (for ``eval.bootstrap`` > 0 of
    ``client.cfg``; none for 0), ``<figure>_low``/``_high``. The linkage rates' are Wilson
    score intervals over the probes (each probe's hit or miss, the candidates fixed:
    metrics.share_interval keeps a width where no probe or every probe is linked). PSNR
    and SSIM resample the (reconstruction, original) pairs (bootstrap seeded by
    ``run.seed``). FID's, as quality.py's, resamples the originals' and the
    reconstructions' features apart, and only in a classifier's features: each resample
    refits both sets' statistics, on one core 5 ms in its 128 features at 500 images but
    0.35 s in Inception's 2048 at 1000 images, a minute per figure at 200 resamples (four
    figures a client)."""
    cut, diffusion, nan, cfg = client.cut, client.diffusion, math.nan, client.cfg
    models = {"own": client.eps_model(True, y)}
    if public is not None:
        models["public"] = public.eps_model(True, None)
    figures: dict[str, Figure] = {}
    fids: dict[str, Figure] = {}
    out: dict = {}
    for name in ("public", "own"):
        if name not in models:
            out.update({f"recon_{name}_{k}": nan for k in ("psnr_db", "ssim", "fid")})
            continue
        recon = attacks.reconstruct(
            diffusion, models[name], *attacks.as_one_release(diffusion, x_c, cut.t_c, releases, stream)
        )
        figures[f"recon_{name}_psnr_db"] = (_psnr, (metrics.mse_per_image(recon, x0),), (-math.inf, math.inf))
        figures[f"recon_{name}_ssim"] = (np.mean, (metrics.ssim_per_image(recon, x0),), (-1.0, 1.0))
        fids[f"recon_{name}_fid"] = (metrics.fid, (real, feats(to_uint8(recon))), (0.0, math.inf))
    images, labels, train_features = train
    candidates = to_model_range(images, x0.device)
    sources = torch.arange(len(images))
    abar = float(diffusion.alphas_cumprod[cut.t_c])
    pixel = attacks.top_k_hits(attacks.pixel_distances(probes, candidates, abar), sources)
    if public is not None:
        denoiser = models["public"]
    else:
        denoiser = client.eps_model(True, torch.from_numpy(labels).to(x0.device) if client.condition else None)
    guess = attacks.reconstruct(
        diffusion, denoiser, *attacks.as_one_release(diffusion, probes, cut.t_c, releases, stream)
    )
    feature = attacks.top_k_hits(attacks.feature_distances(feats(to_uint8(guess)), train_features), sources)
    resamples, seed = cfg.eval.bootstrap, cfg.run.seed
    for space, hits in (("pixel", pixel), ("feature", feature)):
        for k in (1, 5):
            out[f"link_{space}_top{k}"] = float(hits[k].mean())
            if resamples:  # as the other figures: no interval where eval.bootstrap is 0
                out[f"link_{space}_top{k}_low"], out[f"link_{space}_top{k}_high"] = metrics.share_interval(
                    int(hits[k].sum()), len(hits[k])
                )
    out.update(_scored(figures, resamples, seed))
    out.update(_scored(fids, resamples if cfg.eval.extractor == "classifier" else 0, seed))
    return out


def _candidates(
    client: Client, n: int, cached: Callable[[str, np.ndarray], np.ndarray]
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """The linkage candidates: the client's first min(n, train size) training images (uint8
    [M, C, H, W]), their labels (or None) and their features (from the cache)."""
    images, labels = client.reader.read(np.arange(min(n, len(client.reader))))
    return images, labels, cached("train", images)


def attack(
    client: Client,
    clients: list[Client],
    x0: torch.Tensor,
    x_c: torch.Tensor,
    y: torch.Tensor | None,
    real: np.ndarray,
    feats: Callable[[np.ndarray], np.ndarray],
    cached: Callable[[str, np.ndarray], np.ndarray],
    n: int,
) -> dict:
    """Reconstruction and linkage attacks on this client's x_c, one release of each image
    (attacks.py), each figure with its 95% interval over images (:func:`_figures` says
    how each is made). ``x0``, ``x_c``: its test images and their x_c as sent;
    ``y``: their labels when the client's model uses labels; ``real``: the test images'
    features; ``cached(split, images)``: features of real images of the client's shard,
    from the cache; ``n``: at most this many linkage candidates."""
    cut = client.cut
    out: dict = {"t_c": cut.t_c, "public_model": "none"}
    if not cut.uses_server:
        return {**out, "reading": _unsent(client)}
    public = _public(client, clients)
    if public is not None:
        out["public_model"] = f"client {public.id}"
    # linkage: each of M training images released once; is its source the nearest candidate?
    train = _candidates(client, n, cached)
    probes = client.noised_to_cut(to_model_range(train[0], x0.device)).float()
    out.update(_figures(client, public, x0, x_c, y, train, probes, real, feats, 1, None))
    m = len(train[0])
    out.update(
        link_candidates=m,
        link_feature_model="public" if public is not None else "own",
        chance_top1=1 / m,
        chance_top5=min(1.0, 5 / m),
    )
    return out


def attack_releases(
    client: Client,
    clients: list[Client],
    x0: torch.Tensor,
    y: torch.Tensor | None,
    real: np.ndarray,
    feats: Callable[[np.ndarray], np.ndarray],
    cached: Callable[[str, np.ndarray], np.ndarray],
    n: int,
    releases: int,
    stream: torch.Generator,
    single: dict,
) -> dict:
    """:func:`attack`'s figures at ``releases`` releases of each image (the run's count:
    disclosure's ``releases``), named ``<figure>_releases`` (their intervals
    ``<figure>_releases_low``/``_high``), beside ``releases``. The
    adversary averages an image's releases, which it is told (grouping known): an upper
    bound on what the server learns from the run's x_c. Every release draws its noise
    from ``stream``. At one release they are ``single``'s (:func:`attack`'s figures);
    empty where nothing was sent."""
    if not client.cut.uses_server or releases < 1:
        return {}
    if releases == 1:
        return {"releases": 1, **_at_releases(single)}
    diffusion, t_c, dtype = client.diffusion, client.cut.t_c, client.wire_dtype
    train = _candidates(client, n, cached)
    x_k = attacks.release(diffusion, x0, t_c, releases, dtype, stream)
    probes = attacks.release(diffusion, to_model_range(train[0], x0.device), t_c, releases, dtype, stream)
    figures = _figures(client, _public(client, clients), x0, x_k, y, train, probes, real, feats, releases, stream)
    return {"releases": releases, **_at_releases(figures)}


def _at_releases(figures: dict) -> dict:
    """The FIGURES of ``figures`` and their intervals named as at the run's releases:
    ``<figure>_releases``, ``<figure>_releases_low``, ``<figure>_releases_high``."""
    ends = ("", "_low", "_high")
    return {f"{key}_releases{end}": figures[key + end] for key in FIGURES for end in ends if key + end in figures}


def describe(d: dict) -> str:
    """The disclosure figures of one client in one line; only the cut where nothing was sent."""
    if d["reading"] in (NOTHING_SENT, NO_X_C):
        return f"t_c={d['t_c']}: {d['reading']}"
    return (
        f"t_c={d['t_c']} SNR {d['snr']:.3g}, PSNR {d['psnr_db']:.2f} dB, SSIM {d['ssim']:.3f}, "
        f"mu {d['mu_per_release']:.3g} per release x {d['releases']} releases = {d['mu_composed']:.3g} ({d['reading']})"
    )
