"""What the parties could learn beyond one x_c (../shared/spec/algorithm.md, "What the
parties could learn"): membership inference against the models other parties hold, and
memorized outputs. (The third, the server's repeated view of each image, is the attacks'
figures at k releases: attacks.release, disclosure.attack_releases.)

- Membership inference, the loss attack (Matsumoto et al. 2023, Carlini et al. 2023): a
  candidate's score is a model's denoising error ||eps(x_t, t) - eps||^2 (mean over
  pixels), averaged over MIA_STEPS steps t spread evenly over the model's own range and
  MIA_NOISE noise draws at each; members score lower. A model enters as a
  :class:`Target`: its eps, its range of t and how an image x_0 becomes the data it was
  trained on (the split server saw x_c, a release at the client's t_c, and continues the
  chain from it with anchor t_c; a client's model and the federated global model saw x_0).
  Members: the client's training images; non-members: its held-out test images, equal
  counts. ROC AUC (0.5: no better than a coin; 1: every member below every non-member)
  and the true-positive rate at 1% false positives (Carlini et al., S&P 2022), with 95%
  bootstrap intervals (metrics.bootstrap_interval).
- Memorization of outputs: per sample, the distance to its nearest training image of its
  client, against the same distance for the client's held-out real images; the copy
  rate is the share of samples closer than the 5th percentile of the held-out images'
  distances: about 0.05 when nothing is copied, near 1 for copies. In pixels (L2 over
  [-1, 1]) and in the evaluation network's features.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from collafuse_hpc.data import ShardReader, to_model_range
from collafuse_hpc.diffusion.gaussian import GaussianDiffusion
from collafuse_hpc.evaluation import attacks, metrics
from collafuse_hpc.roles.client import Client
from collafuse_hpc.roles.federated import sampling_global
from collafuse_hpc.roles.server import Server
from collafuse_hpc.tables import with_interval

MIA_STEPS = 4  # steps t per candidate, spread evenly over the model's range
MIA_NOISE = 1  # noise draws per step (for the server, each with a fresh x_c): MIA_STEPS in all
MIA_FPR = 0.01  # the false-positive rate of the reported true-positive rate
MIA_MODELS = ("server", "client", "federated")  # the <model> of mia_<model>_auc, in report order
COPY_PERCENTILE = 5.0  # a sample is a copy when nearer its training set than this percentile of held-out images
IMAGE_SETS = ("collaborative", "server_alone", "client_alone", "global")  # the generated sets of images (t = 0)
STREAM = 0x70726976  # "priv": the evaluation's privacy stream, apart from every role's


def stream(seed: int, client: int, device: torch.device) -> torch.Generator:
    """The evaluation's own random stream for client index ``client``'s privacy
    figures, seeded by ``run.seed``: no role's stream is drawn from."""
    state = np.random.SeedSequence([seed, STREAM, client]).generate_state(1)[0]
    return torch.Generator(device).manual_seed(int(state))


def _image(x0: torch.Tensor, _: torch.Generator) -> torch.Tensor:
    return x0


@dataclass(frozen=True)
class Target:
    """A model as the loss attack scores it.

    name: its ``<model>`` in the attribute names (server, client, federated);
    eps: eps(x_t [B, C, H, W], t [B] int64, y [B] int64 or None) -> predicted noise [B, C, H, W];
    steps: (first, last) t of the model's own range, inclusive;
    data: (x_0 [N, C, H, W] in [-1, 1], stream) -> what the model was trained on,
        x_a [N, C, H, W] (x_0 itself by default; the split server's x_c);
    anchor: a of the model's chain q(x_t | x_a) (0; the Markov split's server: t_c).
    """

    name: str
    eps: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    steps: tuple[int, int]
    data: Callable[[torch.Tensor, torch.Generator], torch.Tensor] = _image
    anchor: int = 0


def client_target(client: Client) -> Target:
    """The client's own model (its sampling copy), t in 1..t_c, on its own labels when
    it uses them: the reference point of membership inference."""
    return Target(
        "client", lambda x, t, y: client.eps_model(True, y if client.condition else None)(x, t), (1, client.cut.t_c)
    )


def federated_target(client: Client) -> Target:
    """The federated global model, which the server and every client hold: t in 1..T on
    the client's own labels when the model uses them (a federated client after
    FedHost.personalize)."""

    def eps(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        with sampling_global([client]):
            return client.eps_model(True, y if client.condition else None)(x, t)

    return Target("federated", eps, (1, client.cut.timesteps))


def server_target(server: Server, client: Client) -> Target:
    """The split server's model (its sampling copy) as it saw ``client``'s images: each
    candidate enters as a fresh x_c (a release at t_c in the wire dtype), t in
    t_c+1..T on the server's anchor, with the labels the client shares (the null class
    when it shares none)."""
    cut = client.cut
    t_c = torch.tensor([cut.t_c], device=server.device)

    def eps(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        labels = None
        if server.class_conditioned:
            shared = client.share_labels and y is not None
            labels = y if shared else torch.full((len(x),), server.null_class, device=x.device)
        return server.eps_model(True, t_c, labels)(x, t)

    def data(x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return attacks.release(client.diffusion, x0, cut.t_c, 1, client.wire_dtype, generator)

    return Target("server", eps, (cut.t_c + 1, cut.timesteps), data, cut.server_anchor)


def attack_steps(first: int, last: int) -> list[int]:
    """MIA_STEPS steps spread evenly over first..last: the midpoints of equal strata (fewer
    when the range is shorter)."""
    width = last - first + 1
    return sorted({first + int((j + 0.5) * width / MIA_STEPS) for j in range(MIA_STEPS)})


def loss_scores(
    target: Target,
    diffusion: GaussianDiffusion,
    x0: torch.Tensor,
    y: torch.Tensor | None,
    generator: torch.Generator,
    batch: int,
) -> np.ndarray:
    """The loss attack's score of each candidate x0 [N, C, H, W] in [-1, 1] (labels y [N]
    or None) under ``target``: its mean denoising error (per pixel) over the steps of
    :func:`attack_steps` and MIA_NOISE draws at each, float64 [N]; lower is more likely a
    member. Noise (and the model's data, a fresh x_c for the server) from ``generator``;
    at most ``batch`` model inputs per forward pass."""
    steps = torch.tensor(attack_steps(*target.steps), device=x0.device)
    per = max(1, batch // len(steps))
    out = []
    with torch.inference_mode():
        for i in range(0, len(x0), per):
            chunk, labels = x0[i : i + per], None if y is None else y[i : i + per]
            total = torch.zeros(len(chunk), dtype=torch.float64, device=x0.device)
            t = steps.repeat_interleave(len(chunk))  # (S*B), step-major
            y_t = None if labels is None else labels.repeat(len(steps))

            def eps(x: torch.Tensor, s: torch.Tensor, y_t: torch.Tensor | None = y_t) -> torch.Tensor:
                return target.eps(x, s, y_t)

            for _ in range(MIA_NOISE):
                x_a = target.data(chunk, generator).repeat(len(steps), 1, 1, 1)  # (S*B, C, H, W)
                noise = torch.randn(x_a.shape, generator=generator, device=x0.device)
                losses = diffusion.training_losses(eps, x_a, t, noise, target.anchor)
                total += losses.double().view(len(steps), -1).sum(0)
            out.append(total / (len(steps) * MIA_NOISE))
    return torch.cat(out).cpu().numpy()


def roc_auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """Area under the ROC curve of "a member when its score is below a threshold": the
    chance that a member scores below a non-member, ties counted half (Mann-Whitney U
    over the n m pairs). Scores [n], [m].

    Ranks by numpy: scipy.stats' rankdata would add its import, 0.5 s of CPU, to every
    process that evaluates."""
    scores = np.concatenate([nonmembers, members])
    if np.isnan(scores).any():  # a diverged model's scores have no order: say so, not "chance"
        return float("nan")
    # 1-based ranks, tied scores given the mean of the ranks they span
    _, tied, counts = np.unique(scores, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    ranks = ((last - counts + 1 + last) / 2.0)[tied]
    above = ranks[: len(nonmembers)].sum() - len(nonmembers) * (len(nonmembers) + 1) / 2
    return float(above / (len(members) * len(nonmembers)))


def tpr_at_fpr(members: np.ndarray, nonmembers: np.ndarray, fpr: float = MIA_FPR) -> float:
    """The share of members flagged (score strictly below a threshold) at the highest
    threshold that flags at most ``fpr`` of the non-members (none of them with fewer than
    1 / fpr non-members). Scores [n], [m]."""
    threshold = np.sort(nonmembers)[int(np.floor(fpr * len(nonmembers)))]
    return float((members < threshold).mean())


def mia_figures(name: str, members: np.ndarray, nonmembers: np.ndarray, resamples: int, seed: int) -> dict:
    """``mia_<name>_auc`` and ``mia_<name>_tpr_at_1fpr`` of the scores of the members and
    non-members, with ``_low``/``_high``, their 95% bootstrap intervals over candidates
    (members and non-members resampled apart; none for ``resamples`` 0)."""
    out = {}
    for key, statistic in ((f"mia_{name}_auc", roc_auc), (f"mia_{name}_tpr_at_1fpr", tpr_at_fpr)):
        out[key] = statistic(members, nonmembers)
        if resamples:
            interval = metrics.bootstrap_interval(statistic, (members, nonmembers), resamples, seed, (0.0, 1.0))
            out[f"{key}_low"], out[f"{key}_high"] = interval
    return out


def candidates(shard: str, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Membership candidates of the client whose shard is ``shard``: its first m training
    images (the members) then its first m test images (the non-members), m = min(n, train
    size, test size), as x_0 [2m, C, H, W] in [-1, 1] with labels [2m] (None for a shard
    without labels), and m."""
    readers = [ShardReader(shard, split) for split in ("train", "test")]
    m = min(n, *map(len, readers))
    images, labels = zip(*(reader.read(np.arange(m)) for reader in readers))
    y = None if labels[0] is None else torch.from_numpy(np.concatenate(labels)).to(device)
    return to_model_range(np.concatenate(images), device), y, m


def membership(
    targets: list[Target],
    shard: str,
    diffusion: GaussianDiffusion,
    n: int,
    generator: torch.Generator,
    batch: int,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{target name: (members' scores [m], non-members' scores [m])} of the loss attack
    on each of ``targets``, with the candidates of :func:`candidates`."""
    x0, y, m = candidates(shard, n, generator.device)
    scores = {target.name: loss_scores(target, diffusion, x0, y, generator, batch) for target in targets}
    return {name: (s[:m], s[m:]) for name, s in scores.items()}


def nearest(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from each row of a [N, D] to its nearest row of b [M, D], float64 [N]."""
    return metrics.distances(a, b).min(1)


def copy_rate(samples: np.ndarray, heldout: np.ndarray) -> float:
    """The share of samples whose distance to the training set ([N]) is below the
    COPY_PERCENTILE-th percentile of the held-out images' distances ([M])."""
    return float((samples < np.percentile(heldout, COPY_PERCENTILE)).mean())


def pixels(images: np.ndarray) -> np.ndarray:
    """uint8 images [N, C, H, W] as rows of pixels in [-1, 1], float64 [N, C*H*W]."""
    return images.reshape(len(images), -1) / 127.5 - 1.0


def memorization(
    samples: dict[str, tuple[np.ndarray, np.ndarray]],
    heldout: tuple[np.ndarray, np.ndarray],
    train: ShardReader,
    cached: Callable[[str, np.ndarray], np.ndarray],
    resamples: int,
    seed: int,
) -> dict[str, dict]:
    """{set: {copy_rate_pixel, copy_rate_feature, with _low/_high}} of each generated set
    of ``samples`` ({set: (uint8 images [N, C, H, W], their features [N, D])}) against
    every image of the client's train split ``train`` (its features: ``cached("train",
    images)``) and its held-out images ``heldout`` (uint8 images, features). A 95%
    interval (none for ``resamples`` 0) spans two, from the lower low to the higher high:
    the bootstrap resampling the samples and the held-out images apart, and the Wilson
    interval of the samples' share at the held-out threshold, which keeps a width where no
    sample (or every one) is a copy; there every bootstrap resample gives the same share.
    A conservative span: the bootstrap's symmetric low may reach 0 where copies were seen."""
    images, _ = train.read(np.arange(len(train)))
    spaces = {"pixel": (pixels(images), pixels), "feature": (cached("train", images), np.asarray)}
    out: dict[str, dict] = {name: {} for name in samples}
    for i, (space, (reference, rows)) in enumerate(spaces.items()):
        baseline = nearest(rows(heldout[i]), reference)
        for name, made in samples.items():
            key, near = f"copy_rate_{space}", (nearest(rows(made[i]), reference), baseline)
            out[name][key] = rate = copy_rate(*near)
            if resamples:
                low, high = metrics.bootstrap_interval(copy_rate, near, resamples, seed, (0.0, 1.0))
                w_low, w_high = metrics.share_interval(round(rate * len(near[0])), len(near[0]))
                out[name][f"{key}_low"], out[name][f"{key}_high"] = min(low, w_low), max(high, w_high)
    return out


def describe_membership(figures: dict) -> str:
    """A client's (or the pooled) membership figures in one line."""
    models = [m for m in figures["models"].split(",") if m]
    if not models:
        return "no model scored"
    each = []
    for m in models:
        auc, tpr = (with_interval(figures, f"mia_{m}_{key}") for key in ("auc", "tpr_at_1fpr"))
        each.append(f"{m}'s model AUC {auc}, TPR at 1% FPR {tpr}")
    return f"{'; '.join(each)} ({figures['members']} members against as many held-out images; chance: AUC 0.5)"


def describe_copies(entry: dict) -> str:
    """A client's copy rates (pixels / features) per generated image set in one line."""
    sets = [s for s in IMAGE_SETS if "copy_rate_pixel" in entry.get(s, {})]
    if not sets:
        return "no generated image set"
    each = [
        f"{s} {with_interval(entry[s], 'copy_rate_pixel')} / {with_interval(entry[s], 'copy_rate_feature')}"
        for s in sets
    ]
    return (
        f"share of samples nearer a training image than {100 - COPY_PERCENTILE:g}% of held-out images are "
        f"(pixels / features; {COPY_PERCENTILE / 100:g} when nothing is copied): {', '.join(each)}"
    )
