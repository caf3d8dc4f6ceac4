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
        "reading": metrics.gdp_reading(composed if releases else mu) if sent else NOTHING_SENT,
        "images": len(x0),
    }


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
    """Reconstruction and linkage attacks on this client's x_c (attacks.py). ``x0``, ``x_c``:
    its test images and their x_c as sent; ``y``: their labels when the client's model
    uses labels; ``real``: the test images' features; ``cached(split, images)``: features
    of real images of the client's shard, from the cache; ``n``: at most this many
    linkage candidates."""
    cut, nan = client.cut, math.nan
    out: dict = {"t_c": cut.t_c, "public_model": "none"}
    if not cut.uses_server:
        return {**out, "reading": NOTHING_SENT}
    # the adversary's public denoiser: another client's model trained at t_c (and without labels)
    public = next((o for o in clients if o is not client and o.cut.t_c >= cut.t_c and not o.condition), None)
    models = {"own": client.eps_model(True, y)}
    if public is not None:
        models["public"] = public.eps_model(True, None)
        out["public_model"] = f"client {public.id}"
    recon = {}
    for name in ("public", "own"):
        if name not in models:
            out.update({f"recon_{name}_{k}": nan for k in ("psnr_db", "ssim", "fid")})
            continue
        recon[name] = attacks.reconstruct(client.diffusion, models[name], x_c, cut.t_c)
        out[f"recon_{name}_psnr_db"] = metrics.psnr(recon[name], x0)
        out[f"recon_{name}_ssim"] = metrics.ssim(recon[name], x0)
        out[f"recon_{name}_fid"] = metrics.fid(real, feats(to_uint8(recon[name])))
    # linkage: each of N training images released once; is its source the nearest candidate?
    train = client.reader
    m = min(n, len(train))
    images, labels = train.read(np.arange(m))
    candidates = to_model_range(images, x0.device)
    probes = client.noised_to_cut(candidates).float()
    sources = torch.arange(m)
    abar = float(client.diffusion.alphas_cumprod[cut.t_c])
    pixel = attacks.top_k_rates(attacks.pixel_distances(probes, candidates, abar), sources)
    best = "public" if public is not None else "own"
    if public is not None:
        denoiser = models["public"]
    else:
        denoiser = client.eps_model(True, torch.from_numpy(labels).to(x0.device) if client.condition else None)
    guess = attacks.reconstruct(client.diffusion, denoiser, probes, cut.t_c)
    feature = attacks.top_k_rates(attacks.feature_distances(feats(to_uint8(guess)), cached("train", images)), sources)
    out.update(
        link_candidates=m,
        link_pixel_top1=pixel[1],
        link_pixel_top5=pixel[5],
        link_feature_top1=feature[1],
        link_feature_top5=feature[5],
        link_feature_model=best,
        chance_top1=1 / m,
        chance_top5=min(1.0, 5 / m),
    )
    return out


def describe(d: dict) -> str:
    """The disclosure figures of one client in one line; only the cut where nothing was sent."""
    if d["reading"] == NOTHING_SENT:
        return f"t_c={d['t_c']}: {NOTHING_SENT}"
    return (
        f"t_c={d['t_c']} SNR {d['snr']:.3g}, PSNR {d['psnr_db']:.2f} dB, SSIM {d['ssim']:.3f}, "
        f"mu {d['mu_per_release']:.3g} per release x {d['releases']} releases = {d['mu_composed']:.3g} ({d['reading']})"
    )
