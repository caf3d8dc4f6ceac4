"""Evaluation math in one place: FID, KID, pixel similarity and the disclosure of x_c.

Inputs are plain arrays; nothing here loads models or files.

- FID: Frechet distance between Gaussians fitted to two feature sets,
  ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}), statistics in float64.
- KID: unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3,
  averaged over random subsets (mean and std over subsets).
- Pixel MSE, PSNR and SSIM for images in [-1, 1] (data range 2).
- Disclosure of a release x_c = sqrt(abar) x_0 + sqrt(1 - abar) eps of x_0 in
  [-1, 1]^d: SNR = abar / (1 - abar); a Gaussian mechanism with L2 sensitivity
  2 sqrt(d abar) and noise sqrt(1 - abar), i.e. mu-GDP with mu = 2 sqrt(d SNR);
  k releases of the same image compose to mu sqrt(k).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (float64, unbiased) of features [N, D]."""
    f = _at_least_two(features)
    return f.mean(0), np.cov(f, rowvar=False)


def _at_least_two(features: np.ndarray) -> np.ndarray:
    f = np.asarray(features, dtype=np.float64)
    if len(f) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(f)}")
    return f


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((S1 S2)^{1/2}) of covariances S1, S2 [D, D] (symmetric PSD), float64.

    S1 S2 is similar to S1^{1/2} S2 S1^{1/2}, which is symmetric PSD: the trace is
    the sum of the square roots of its eigenvalues. Exact, and singular matrices
    (fewer images than dimensions) need no offset; round-off negatives count as 0."""
    w, v = np.linalg.eigh(sigma1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(root @ sigma2 @ root), 0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    diff = mu1 - mu2
    distance = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))
    return max(distance, 0.0)  # round-off makes equal sets slightly negative


def fid(real: np.ndarray, fake: np.ndarray) -> float:
    """FID between feature sets real [N, D] and fake [M, D], exact in float64.

    With centred features A [N, D] and B [M, D], S1 = A^T A / (N - 1) and
    S2 = B^T B / (M - 1), the nonzero eigenvalues of S1 S2 are the squared singular
    values of A B^T / sqrt((N - 1)(M - 1)) [N, M], so Tr((S1 S2)^{1/2}) is that
    matrix's nuclear norm. Used when it is cheaper than the [D, D] route (sets
    smaller than the feature dimension, e.g. 1000 images of 2048 features)."""
    a, b = _at_least_two(real), _at_least_two(fake)
    n, m, d = len(a), len(b), a.shape[1]
    mu_a, mu_b = a.mean(0), b.mean(0)
    a, b = a - mu_a, b - mu_b
    if n * m * d + min(n, m) ** 2 * max(n, m) > (n + m) * d * d + 3 * d**3:  # flops of each route
        return frechet_distance(mu_a, a.T @ a / (n - 1), mu_b, b.T @ b / (m - 1))
    cross = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt((n - 1) * (m - 1))
    diff = mu_a - mu_b
    distance = diff @ diff + np.einsum("ij,ij->", a, a) / (n - 1) + np.einsum("ij,ij->", b, b) / (m - 1) - 2 * cross
    return max(float(distance), 0.0)


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    m, n = len(x), len(y)
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean()
    )


def kid(real: np.ndarray, fake: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0):
    """KID (mean, std) over ``subsets`` random subsets of ``min(subset_size, N, M)`` each.

    The std is NaN (not available) when every subset is the whole of both sets:
    then all subsets agree and their spread says nothing about the estimate."""
    x, y = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    size = min(subset_size, len(x), len(y))
    if size < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {min(len(x), len(y))}")
    rng = np.random.default_rng(seed)
    values = [
        _mmd2_unbiased(x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)])
        for _ in range(subsets)
    ]
    spread = subsets > 1 and (size < len(x) or size < len(y))
    return float(np.mean(values)), float(np.std(values)) if spread else math.nan


def mse_per_image(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Mean squared error per pixel of each pair of images [N, C, H, W] in [-1, 1]: float64 [N]."""
    return (a.double() - b.double()).pow(2).flatten(1).mean(1).cpu().numpy()


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared error per pixel of images [N, C, H, W] in [-1, 1]."""
    return float(mse_per_image(a, b).mean())


def psnr_of_mse(error: float) -> float:
    """PSNR in dB for data range 2 (images in [-1, 1]) of a mean squared error per pixel
    (infinite for 0: identical images, e.g. x_c at c = 0)."""
    return math.inf if error == 0 else 10 * math.log10(4.0 / error)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB for data range 2 of images [N, C, H, W] in [-1, 1], from the mean MSE
    over all images."""
    return psnr_of_mse(mse(a, b))


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """Mean SSIM of images [N, C, H, W]: the mean of :func:`ssim_per_image` (every image
    has as many windows)."""
    return float(ssim_per_image(a, b, data_range).mean())


def ssim_per_image(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> np.ndarray:
    """SSIM (Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03) of each pair of images
    [N, C, H, W], the mean over its windows and channels: float64 [N].

    Windows are clipped at the borders (valid convolution), as in the reference
    implementation; images smaller than the window use a window of their size."""
    a, b = a.double(), b.double()
    size = min(11, a.shape[-1], a.shape[-2])
    coords = torch.arange(size, dtype=torch.float64, device=a.device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(a.shape[1], 1, size, size).contiguous()

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, window, groups=x.shape[1])

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1).cpu().numpy()


def snr(abar: float) -> float:
    """SNR(t_c) = abar_{t_c} / (1 - abar_{t_c}); infinite at t_c = 0 (raw images)."""
    return math.inf if abar >= 1 else abar / (1 - abar)


def gdp_mu(dims: int, abar: float, releases: int = 1) -> float:
    """mu of the Gaussian-DP view of ``releases`` releases of one image with ``dims`` pixels."""
    return 2 * math.sqrt(dims * snr(abar)) * math.sqrt(releases)


def gdp_reading(mu: float) -> str:
    """What a mu-GDP value means in plain words (1-GDP is a strong guarantee; the
    hypothesis-testing advantage of an attacker is 2 Phi(mu / 2) - 1)."""
    if mu <= 1:
        return "strong: an attacker can hardly tell whether an image was used"
    if mu <= 3:
        return "weak: noticeable leakage"
    return "none in practice: the noise does not hide the image (mu > 3)"


def knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Distance from each row of x [N, D] to its k-th nearest other row [N]. The row
    itself and exact copies of it (a bootstrap resample repeats rows) are not neighbours:
    they are told by identity, not by a distance near 0, which round-off can exceed."""
    return np.partition(_others(x)[0], k - 1, axis=1)[:, k - 1]


def _others(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distances [N, N] between the rows of x [N, D], inf between a row and its copies,
    and which distinct row each row is a copy of [N]."""
    d = distances(x, x)
    _, copy_of = np.unique(x, axis=0, return_inverse=True)
    copy_of = copy_of.reshape(-1)
    d[copy_of[:, None] == copy_of[None, :]] = np.inf
    return d, copy_of


def distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances [N, M] between the rows of a [N, D] and b [M, D], float64.

    By the Gram matrix, after moving both sets' common mean to 0: |a|^2 + |b|^2 - 2ab
    then cancels no large norms, so each distance is exact to about 1e-15 of the
    spread of the features rather than of their norm."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    centre = np.concatenate([a, b]).mean(0)
    a, b = a - centre, b - centre
    squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.maximum(squared, 0))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) in feature space.

    Precision: the share of generated samples inside the real manifold (the union of
    balls around each real sample reaching its k-th nearest real neighbour): "are the
    samples like real ones?". Recall: the share of real samples inside the generated
    manifold: "is every kind of real image generated?". Sharp samples of too few classes
    score high precision and low recall; blurry but diverse ones the reverse."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    k = min(k, len(real) - 1, len(fake) - 1)
    if k < 1:
        raise ValueError("precision and recall need at least 2 images per set")
    d = distances(fake, real)  # [M, N]
    precision = float((d <= knn_radii(real, k)[None, :]).any(1).mean())
    recall = float((d <= knn_radii(fake, k)[:, None]).any(0).mean())
    return precision, recall


def precision_recall_bootstrap(
    real: np.ndarray, fake: np.ndarray, k: int = 3, resamples: int = 200, seed: int = 0
) -> tuple[tuple[float, float], tuple[tuple[float, float], tuple[float, float]]]:
    """(precision, recall) and their 95% intervals over images: :func:`precision_recall`
    and its :func:`bootstrap_interval` with the same resamples, from one distance matrix.

    A resample's rows are the original rows, some repeated: its distances are the
    originals', and a row's k-th nearest other row is the first of its originals' sorted
    neighbours (copies of it excluded) at which the neighbours' counts in the resample
    reach k. So no resample recomputes distances, but for a row of which it drew fewer
    than k of the nearest neighbours kept (:class:`_Neighbours`). The numbers are those
    of recomputing each resample but where a distance ties a radius exactly: there the
    two differ by round-off, as any two computations of the distances do."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    k = min(k, len(real) - 1, len(fake) - 1)
    if k < 1:
        raise ValueError("precision and recall need at least 2 images per set")
    cross = distances(fake, real)  # [M, N]
    near_real, near_fake = _Neighbours(real, k), _Neighbours(fake, k)

    def shares(count_real: np.ndarray, count_fake: np.ndarray) -> tuple[float, float]:
        """(precision, recall) of the resample holding real row i ``count_real[i]`` times
        ([N]) and fake row j ``count_fake[j]`` times ([M])."""
        in_real = (cross <= near_real.radii(count_real)[None, :]).any(1)  # [M]: each fake row in the real manifold
        in_fake = (cross <= near_fake.radii(count_fake)[:, None]).any(0)  # [N]: each real row in the generated one
        return float(np.average(in_real, weights=count_fake)), float(np.average(in_fake, weights=count_real))

    estimate = shares(np.ones(len(real), np.int64), np.ones(len(fake), np.int64))
    values = np.array(
        [
            shares(np.bincount(rows_real, minlength=len(real)), np.bincount(rows_fake, minlength=len(fake)))
            for rows_real, rows_fake in resample_rows((real, fake), resamples, seed)
        ]
    )
    return estimate, tuple(normal_interval(estimate[i], values[:, i], (0.0, 1.0)) for i in range(2))


class _Neighbours:
    """Each row's nearest other rows of x [N, D] in order, copies of it (identical rows)
    left out, for the k-th nearest other row of a bootstrap resample (:meth:`radii`)."""

    def __init__(self, x: np.ndarray, k: int, keep: int = 64):
        self.x, self.k = x, k
        d, self.copy_of = _others(x)
        keep = min(max(keep, k), len(x))  # the nearest ``keep`` suffice unless a resample draws too few of them
        nearest = np.argpartition(d, keep - 1, axis=1)[:, :keep]
        order = np.take_along_axis(d, nearest, 1).argsort(1, kind="stable")
        self.order = np.take_along_axis(nearest, order, 1)  # [N, keep]
        self.sorted = np.take_along_axis(d, self.order, 1)

    def radii(self, counts: np.ndarray) -> np.ndarray:
        """Each row's distance to its k-th nearest other row in the resample that holds
        original row i ``counts[i]`` times [N]: inf when it holds fewer than k others,
        -inf for a row it does not hold (no ball)."""
        radius = np.full(len(counts), -np.inf)
        rows = np.flatnonzero(counts)
        reached = np.cumsum(counts[self.order[rows]], axis=1) >= self.k  # [R, keep]
        found = reached.any(1)
        radius[rows[found]] = self.sorted[rows[found], reached[found].argmax(1)]
        for i in rows[~found]:
            if self.order.shape[1] == len(counts):  # every other row was kept: fewer than k in the resample
                radius[i] = np.inf
            else:  # beyond the nearest kept: the whole row
                d = distances(self.x[i : i + 1], self.x)[0]
                d[self.copy_of == self.copy_of[i]] = np.inf
                radius[i] = np.sort(np.repeat(d, counts))[self.k - 1]
        return radius


def class_fidelity(probabilities: np.ndarray, held: set[int]) -> tuple[float, float]:
    """(share of images whose predicted class is one the client holds, mean confidence
    of the prediction) for class probabilities [N, classes]."""
    predicted = probabilities.argmax(1)
    return float(np.isin(predicted, sorted(held)).mean()), float(probabilities.max(1).mean())


def class_distance(probabilities: np.ndarray, own: np.ndarray) -> float:
    """Total variation between the predicted classes of images (probabilities [N,
    classes]) and a client's own label mix (counts per class [classes]): 0 when the
    samples' classes come in the client's proportions, 1 when they share no class. Where
    class fidelity only asks "in a held class?", this also sees the proportions, which
    matters when a client holds every class in different amounts (a Dirichlet partition)."""
    predicted = np.bincount(probabilities.argmax(1), minlength=len(own)) / len(probabilities)
    return float(0.5 * np.abs(predicted - own / own.sum()).sum())


def bootstrap_interval(
    statistic, arrays: tuple[np.ndarray, ...], resamples: int = 200, seed: int = 0, bounds=(-np.inf, np.inf)
) -> tuple[float, float]:
    """95% interval of ``statistic(*arrays)`` over images: the estimate +- 1.96 bootstrap
    standard errors, each array resampled with replacement (its own rows, independently)
    ``resamples`` times. Centred on the estimate rather than the resamples' percentiles:
    resampling biases FD upwards (repeated rows shrink the spread of a set), which shifts
    percentile intervals off the estimate. The interval is clipped to ``bounds``, the
    statistic's range (a share stays in [0, 1]). An infinite estimate (the PSNR of exact
    copies, whose every resample is infinite too) is its own interval."""
    estimate = statistic(*arrays)
    if math.isinf(estimate):
        return float(estimate), float(estimate)
    values = [statistic(*(a[i] for a, i in zip(arrays, draw))) for draw in resample_rows(arrays, resamples, seed)]
    return normal_interval(estimate, values, bounds)


def resample_rows(arrays: tuple[np.ndarray, ...], resamples: int, seed: int) -> Iterator[list[np.ndarray]]:
    """The rows each bootstrap resample takes of each array (with replacement, as many as
    it has): one list of index arrays per resample, the same for the same ``seed``.
    Fewer than 2 resamples have no spread, so no interval: refused here, for every caller."""
    if resamples < 2:
        raise ValueError(f"a bootstrap interval needs at least 2 resamples, got {resamples} (0: ask for no interval)")
    rng = np.random.default_rng(seed)
    return ([rng.integers(0, len(a), len(a)) for a in arrays] for _ in range(resamples))


def normal_interval(estimate: float, values: list[float] | np.ndarray, bounds=(-np.inf, np.inf)) -> tuple[float, float]:
    """``estimate`` +- 1.96 standard deviations of its resampled ``values``, clipped to ``bounds``."""
    error = float(np.std(values, ddof=1))
    return float(max(bounds[0], estimate - 1.96 * error)), float(min(bounds[1], estimate + 1.96 * error))


def share_interval(hits: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of the share ``hits / trials`` of independent trials (the
    probes of a linkage attack). Unlike the estimate +- 1.96 standard errors, it keeps a
    width at a share of 0 or 1: none of 288 probes linked gives [0, 0.013], not the
    certainty [0, 0] that no probe ever would be. No trials: [0, 1]."""
    if trials == 0:
        return 0.0, 1.0
    share, q = hits / trials, z * z / trials
    centre = (share + q / 2) / (1 + q)
    half = z / (1 + q) * math.sqrt(share * (1 - share) / trials + q / (4 * trials))
    return max(0.0, centre - half), min(1.0, centre + half)
