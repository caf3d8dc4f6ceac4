"""Disclosure by attack: what an adversary holding x_c can recover of x_0.

x_c's SNR, PSNR and the Gaussian-DP mu (metrics.py) describe the release; these
attacks measure it:

- reconstruction: Tweedie's estimate, the predicted x_0 at t_c,
  x0_hat = (x_c - sqrt(1 - abar) eps(x_c, t_c)) / sqrt(abar), clipped to [-1, 1], with
  a denoiser the adversary could plausibly have. ``public``: a model trained on other
  data of the same kind (evaluate uses another client's model that covers t_c);
  ``own``: the client's own model, an upper bound (the adversary has the best
  denoiser there is for this data).
- linkage: for each released x_c of a training image, rank the client's training
  images as its source. In pixel space by ||x_c - sqrt(abar) x_j||^2, the
  likelihood ratio test for Gaussian noise (the optimal attack); in feature space
  by the distance between the features of the public reconstruction and of each
  candidate. Top-k rate: how often the true source is among the k nearest; chance
  is k / N for N candidates.
"""

from __future__ import annotations

import numpy as np
import torch

from collafuse_hpc.diffusion.gaussian import EpsModel, GaussianDiffusion


def reconstruct(diffusion: GaussianDiffusion, eps_model: EpsModel, x_c: torch.Tensor, t_c: int) -> torch.Tensor:
    """Tweedie's x0_hat [N, C, H, W] in [-1, 1] of x_c [N, C, H, W] at step t_c (x_c itself at t_c = 0)."""
    if t_c == 0:
        return x_c.clamp(-1, 1)
    t = torch.full((len(x_c),), t_c, device=x_c.device)
    with torch.inference_mode():
        return diffusion.predict_anchor(x_c, t, eps_model(x_c, t).to(x_c.dtype)).clamp(-1, 1)


def pixel_distances(x_c: torch.Tensor, candidates: torch.Tensor, abar: float) -> torch.Tensor:
    """||x_c_i - sqrt(abar) x_j||^2 of probes x_c [P, ...] and candidates [N, ...]: float64 [P, N]."""
    probes = x_c.flatten(1).double()
    scaled = candidates.flatten(1).double() * abar**0.5
    return torch.cdist(probes, scaled).pow(2)


def feature_distances(probes: np.ndarray, candidates: np.ndarray) -> torch.Tensor:
    """Euclidean distances of probe features [P, D] to candidate features [N, D]: float64 [P, N]."""
    return torch.cdist(torch.from_numpy(probes).double(), torch.from_numpy(candidates).double())


def top_k_rates(distances: torch.Tensor, sources: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """{k: fraction of probes whose true source (index into the candidates, [P]) is among
    the k nearest candidates}; ties count against the attacker."""
    truth = distances.gather(1, sources.reshape(-1, 1).to(distances.device))
    closer = (distances < truth).sum(1) + (distances == truth).sum(1) - 1  # candidates ranked before the source
    return {k: float((closer < k).double().mean()) for k in ks}


def describe(a: dict) -> str:
    """The attack figures of one client in one line; where nothing was sent, or no other
    client's model could serve as the public one, it says so instead of NaNs."""
    if "link_pixel_top1" not in a:
        return a.get("reading", "-")
    public = "no public model"
    if a["public_model"] != "none":
        public = f"{a['recon_public_psnr_db']:.2f} dB / {a['recon_public_ssim']:.3f} with a public model "
        public += f"({a['public_model']})"
    return (
        f"reconstruction PSNR / SSIM {public}, {a['recon_own_psnr_db']:.2f} dB / {a['recon_own_ssim']:.3f} with "
        "its own; "
        f"linkage top-1 {a['link_pixel_top1']:.3f} (pixels), {a['link_feature_top1']:.3f} (features) of "
        f"{a['link_candidates']} candidates, chance {a['chance_top1']:.3f}"
    )
