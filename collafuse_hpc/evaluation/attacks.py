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
- intervals (disclosure.py): 95% intervals over images; a linkage rate's is the Wilson
  score interval of its probes' hits against the fixed candidates, the reconstruction
  figures' bootstrap the (reconstruction, original) pairs.
- repeated releases: the server receives each training image's x_c k times (images
  sent / training images), each with fresh noise. An adversary that groups an image's
  releases (here the grouping is given: an upper bound) averages them,
  x_bar = sqrt(abar) x_0 + sqrt((1 - abar) / k) eps: one release at k times the SNR.
  The pixel linkage ranks by ||x_bar - sqrt(abar) x_j||^2 (still the likelihood ratio
  test); a denoiser sees x_bar as one release at the step whose SNR is at most k SNR(t_c)
  (:func:`as_one_release`).
"""

from __future__ import annotations

import numpy as np
import torch

from collafuse_hpc.diffusion.gaussian import EpsModel, GaussianDiffusion
from collafuse_hpc.tables import with_interval


def release(
    diffusion: GaussianDiffusion, x0: torch.Tensor, t_c: int, k: int, dtype: torch.dtype, generator: torch.Generator
) -> torch.Tensor:
    """The mean of k releases of x0 [N, C, H, W] at step t_c, each x_c = q_sample(x0, t_c)
    with fresh noise from ``generator`` in the wire ``dtype`` (as the server received it):
    float32 [N, C, H, W]; one release for k = 1."""
    t = torch.full((len(x0),), t_c, device=x0.device)
    total = torch.zeros_like(x0, dtype=torch.float32)
    for _ in range(k):
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        total += diffusion.q_sample(x0, t, noise).to(dtype).float()
    return total / k


def as_one_release(
    diffusion: GaussianDiffusion, x_bar: torch.Tensor, t_c: int, k: int, generator: torch.Generator
) -> tuple[torch.Tensor, int]:
    """The mean x_bar [N, C, H, W] of k releases at t_c as one release x_s at the step s <= t_c
    whose SNR is the largest not above k SNR(t_c): x_bar scaled by sqrt(abar_s / abar_{t_c}),
    with the missing noise variance abar_s (1 / SNR(s) - 1 / (k SNR(t_c))) drawn from
    ``generator``. Returns (x_s, s); (x_bar, t_c) for k = 1 or t_c = 0."""
    if k == 1 or t_c == 0:
        return x_bar, t_c
    abar = diffusion.alphas_cumprod
    snr = abar[1 : t_c + 1] / (1 - abar[1 : t_c + 1])  # SNR(1..t_c), falling
    target = k * snr[-1]
    s = 1 + int(np.argmax(snr <= target))  # the first step whose SNR is not above k SNR(t_c)
    top_up = abar[s] * (1 / snr[s - 1] - 1 / target)
    noise = torch.randn(x_bar.shape, generator=generator, device=x_bar.device)
    return x_bar * (abar[s] / abar[t_c]) ** 0.5 + top_up**0.5 * noise, s


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


def top_k_hits(distances: torch.Tensor, sources: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, np.ndarray]:
    """{k: for each probe, whether its true source (index into the candidates, [P]) is among
    the k nearest candidates, bool [P]}; ties count against the attacker. The mean over
    the probes is the top-k rate."""
    truth = distances.gather(1, sources.reshape(-1, 1).to(distances.device))
    closer = (distances < truth).sum(1) + (distances == truth).sum(1) - 1  # candidates ranked before the source
    return {k: (closer < k).cpu().numpy() for k in ks}


def describe(a: dict) -> str:
    """The attack figures of one client in one line; where nothing was sent, or no other
    client's model could serve as the public one, it says so instead of NaNs."""
    if "link_pixel_top1" not in a:
        return a.get("reading", "-")
    public = "no public model"
    if a["public_model"] != "none":
        public = f"{with_interval(a, 'recon_public_psnr_db', 2)} dB / {with_interval(a, 'recon_public_ssim')} "
        public += f"with a public model ({a['public_model']})"
    own = f"{with_interval(a, 'recon_own_psnr_db', 2)} dB / {with_interval(a, 'recon_own_ssim')}"
    line = (
        f"reconstruction PSNR / SSIM {public}, {own} with its own; "
        f"linkage top-1 {with_interval(a, 'link_pixel_top1')} (pixels), {with_interval(a, 'link_feature_top1')} "
        f"(features) of {a['link_candidates']} candidates, chance {a['chance_top1']:.3f}"
    )
    if "releases" not in a:
        return line
    return (
        f"{line}; at its {a['releases']} releases per image, averaged (grouping known: an upper bound): linkage "
        f"top-1 {with_interval(a, 'link_pixel_top1_releases')} (pixels), "
        f"{with_interval(a, 'link_feature_top1_releases')} (features), "
        f"reconstruction PSNR {with_interval(a, 'recon_own_psnr_db_releases', 2)} dB with its own model"
    )
