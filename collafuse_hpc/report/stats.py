"""The study's statistics, for the report (``collafuse-hpc report``): each condition against its baseline,
with intervals, and whether a run's training loss has stopped falling.

Baseline (H1): every client training the whole chain alone on its own data, c = 1,
the run a user would do instead of collaborating. Each point (condition, c, client or
pooled) is compared with the c = 1 run of the same partition and seed:

- with several seeds: the mean of the paired differences over seeds and its 95%
  t-interval (``interval = "seeds"``), never narrower than the images' noise of that
  mean (``"seeds (images floor)"``; :func:`seeds_half`);
- with one seed: the difference of the two runs and a 95% interval from their
  bootstrap intervals over images (half-widths added in quadrature;
  ``interval = "images"``).

A verdict says where collaboration wins (the whole interval on the better side),
loses (on the worse side) or ties (the interval holds 0); "no interval" with one seed
and no intervals over images.
"""

from __future__ import annotations

import math

import h5py
import numpy as np
import yaml
from scipy import stats

from collafuse_hpc.evaluation import metrics

# metric -> (its column, +1 if higher is better, -1 if lower is better)
COMPARED = {
    "class fidelity": ("fidelity", +1),
    "class distance": ("class_distance", -1),
    "FD": ("fid_collaborative", -1),
    "precision": ("precision", +1),
    "recall": ("recall", +1),
    # fewer samples nearer a training image than held-out images are: fewer memorized outputs
    "copied (pixels)": ("copy_rate_pixel", -1),
    "copied (features)": ("copy_rate_feature", -1),
}
# the convergence check compares the mean loss over the last 10% of rounds with the 10% before (for the clients'
# mean loss and for the server's; the report takes the larger)
WINDOW = 0.1
CONVERGED = 0.02  # share of the whole fall still happening at the end: below it (or within its scatter), converged


def seeds_half(values: list[float], image_halves: list[float]) -> tuple[float, str]:
    """(half-width, what it is over) of the 95% interval of the mean of ``values``, one per
    seed, each with the half-width of its own 95% interval over images: over several seeds
    the t-interval (``"seeds"``), never narrower than the images' noise of the mean,
    sqrt(sum h^2) / n (``"seeds (images floor)"``: two seeds that happen to agree would
    give a zero-width interval); over one seed its images' (``"images"``). A run's
    half-width is half its interval's width, as versus_c1 has always taken it
    (:func:`pooled_interval` takes the wider side: for a rate clipped at 0 this floor is
    up to half as wide). The floor counts the seeds with an interval over images (a seed
    without one cannot lift it off); none at all leaves the floor out, or with one seed
    the interval; values that are not all finite (a PSNR of inf) give NaN."""
    known = [h for h in image_halves if not math.isnan(h)]
    images = math.sqrt(sum(h**2 for h in known)) / len(values) if known else math.nan
    if len(values) == 1:
        return images, "images"
    if not all(map(math.isfinite, values)):
        return math.nan, "seeds"
    seeds = float(stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values)))
    if math.isnan(images) or seeds >= images:
        return seeds, "seeds"
    return images, "seeds (images floor)"


def image_half(row: dict, column: str) -> float:
    """Half-width of one run's 95% interval over images of ``column``: half its width (NaN
    when it has none)."""
    return (row.get(f"{column}_high", math.nan) - row.get(f"{column}_low", math.nan)) / 2


def _image_half(run: dict, base: dict, column: str) -> float:
    """Half-width of the 95% interval over images of one difference run - base: the two
    runs' own intervals in quadrature (NaN when a run has none)."""
    return math.hypot(image_half(run, column), image_half(base, column))


def _pairs(table: list[dict]) -> tuple[dict[tuple, list[tuple[dict, dict]]], dict[tuple, list]]:
    """Each point's (run, its c = 1 run of the same partition, seed and client) pairs, and
    the seeds of each point that have no such c = 1 run; keys (method, split, partition,
    share, c, who). The points: every split run with one cut c < 1, and every federated run."""
    baseline = {(r["partition"], r["seed"], r["who"]): r for r in table if _alone(r)}
    groups: dict[tuple, list[tuple[dict, dict]]] = {}
    unpaired: dict[tuple, list] = {}
    for r in table:
        if not _point(r):
            continue
        point = (r["method"], r["split"], r["partition"], r["share"], r["c"], r["who"])
        base = baseline.get((r["partition"], r["seed"], r["who"]))
        if base is None:
            unpaired.setdefault(point, []).append(r["seed"])
        else:
            groups.setdefault(point, []).append((r, base))
    return groups, unpaired


def _point(row: dict) -> bool:
    """A run compared with c = 1: a split run with one cut c < 1 for every client, or a
    federated run."""
    return not _alone(row) and not (row["method"] == "split" and isinstance(row["c"], str))


def _alone(row: dict) -> bool:
    """Each client training alone (c = 1): the baseline every point is compared with."""
    return row["method"] == "split" and row["c"] == 1


def unpaired_seeds(table: list[dict]) -> list[str]:
    """A sentence for each point (its pooled row) with seeds that :func:`versus_baseline`
    leaves out for want of a c = 1 run of their partition and seed (only for partitions
    with a c = 1 run at all: without one there is no comparison to leave seeds out of)."""
    _, unpaired = _pairs(table)
    compared = {r["partition"] for r in table if _alone(r)}
    return [
        f"{method}, split {split}, partition {partition}, labels shared {share}, c = {c}: seed(s) "
        f"{', '.join(map(str, sorted(seeds)))} left out of versus_c1 (no c = 1 run of that partition and seed)"
        for (method, split, partition, share, c, who), seeds in sorted(unpaired.items(), key=lambda kv: str(kv[0]))
        if who == "pooled" and partition in compared
    ]


def no_comparison(table: list[dict]) -> str:
    """Why :func:`versus_baseline` has no row for ``table``: each run's rows, with their
    seeds (not aggregate()'s)."""
    if not any(_alone(r) for r in table):
        return "no run at c = 1 (each client training alone) to compare with"
    if not any(_point(r) for r in table):
        return "no run to compare with c = 1 (one cut ratio c < 1 for every client, or a federated run)"
    if not _pairs(table)[0]:
        return "no run compared with c = 1 has a c = 1 run of its partition and seed"
    return f"no compared metric ({', '.join(COMPARED)}) has a value in both runs of a pair"


def versus_baseline(table: list[dict]) -> list[dict]:
    """One row per (split, partition, share, c, who, metric) of every c < 1 with a c = 1 run
    of the same partition and seed: the difference to c = 1, its 95% interval, what the
    interval is over, the verdict, and the point's seeds left out for want of a c = 1 run."""
    groups, unpaired = _pairs(table)
    out = []
    for (method, split, partition, share, c, who), pairs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        left_out = ", ".join(map(str, sorted(unpaired.get((method, split, partition, share, c, who), [])))) or "-"
        for metric, (column, sign) in COMPARED.items():
            deltas = [run[column] - base[column] for run, base in pairs]
            if any(math.isnan(d) for d in deltas):
                continue
            mean = float(np.mean(deltas))
            half, over = seeds_half(deltas, [_image_half(run, base, column) for run, base in pairs])
            low, high = mean - half, mean + half
            better, worse = (low > 0, high < 0) if sign > 0 else (high < 0, low > 0)
            verdict = "wins" if better else "loses" if worse else "ties"
            if math.isnan(low) or math.isnan(high):
                verdict = "no interval"  # one seed and no intervals over images (features other than a classifier)
            out.append(
                dict(method=method, split=split, partition=partition, share=share, c=c, who=who, metric=metric,
                     seeds=len(deltas),
                     delta=mean, low=float(low), high=float(high), interval=over, verdict=verdict,
                     unpaired=left_out)
            )  # fmt: skip
    return out


def pooled_interval(estimates: list[float], lows: list[float], highs: list[float], bounds=(0.0, 1.0)):
    """(mean, low, high) of the mean over K clients of independent estimates, each with its
    95% interval over its own images: the half-widths add in quadrature, sqrt(sum h_k^2) / K,
    about sqrt(K) narrower than the mean of the bounds. A half-width is the wider side of
    an interval (an interval clipped at 0 or 1 is narrower on that side). Clients without
    an estimate are left out; a client without an interval leaves the mean without one."""
    kept = [(e, lo, hi) for e, lo, hi in zip(estimates, lows, highs, strict=True) if not math.isnan(e)]
    if not kept:
        return math.nan, math.nan, math.nan
    mean = sum(e for e, _, _ in kept) / len(kept)
    half = math.sqrt(sum(max(e - lo, hi - e) ** 2 for e, lo, hi in kept)) / len(kept)
    if math.isnan(half):  # a client without an interval: the mean has none
        return mean, math.nan, math.nan
    return mean, max(bounds[0], mean - half), min(bounds[1], mean + half)


def pooled_share(shares: list[float], lows: list[float], trials: list[float]):
    """(share, low, high) of the clients' trials taken together (a linkage rate's probes):
    the hits over every client's trials, with the Wilson interval of that share. A share of
    independent trials pools exactly; pooled_interval's quadrature would take each
    client's Wilson interval, wide above and narrow below near 0, as symmetric and reach 0
    where hits were seen. Clients without a share are left out; a client without an
    interval (``lows`` NaN) leaves the pooled share without one."""
    kept = [(s, lo, n) for s, lo, n in zip(shares, lows, trials, strict=True) if not math.isnan(s)]
    if not kept:
        return math.nan, math.nan, math.nan
    hits, total = sum(round(s * n) for s, _, n in kept), sum(int(n) for _, _, n in kept)
    if any(math.isnan(lo) for _, lo, _ in kept):
        return hits / total, math.nan, math.nan
    return hits / total, *metrics.share_interval(hits, total)


def _by_round(rows: h5py.Group, column: str, n: int) -> np.ndarray:
    """``column`` of a role's rows at the index of its round, NaN in rounds without a row
    (a server no client sent to, rows a crash lost)."""
    out = np.full(n, np.nan)
    out[rows["round"][()]] = rows[column][()]
    return out


def loss_curves(path: str) -> dict[str, np.ndarray]:
    """{"rounds" (0 to the last round logged), "clients" (mean local loss over the clients
    that trained, per round; absent when none did, as at c = 0), "server" (when it
    trained; a federated server trains nothing itself), "server_rounds" (its rounds:
    "rounds"), "steps" (optimizer steps a client round's loss is the mean of: a
    federated round's E, else 1)} of one results file, each loss at the index of its
    round (NaN where no role logged one)."""
    out = {}
    with h5py.File(path, "r") as f:
        config = yaml.safe_load(f.attrs.get("config", "{}")) or {}  # (files made by hand in tests hold none)
        federated = config.get("run", {}).get("method", "split") == "federated"
        out["steps"] = config.get("federated", {}).get("local_steps", 1) if federated else 1
        clients, server = [f[f"clients/{c}/rounds"] for c in f["clients"]], f["server"].get("rounds")
        logged = [g["round"][()] for g in clients + ([server] if server is not None else [])]
        n = max((int(r[-1]) + 1 for r in logged if len(r)), default=0)
        out["rounds"] = np.arange(n)
        local = np.stack([_by_round(g, "loss_local", n) for g in clients])
        trained = np.isfinite(local).sum(0)
        if trained.any():
            out["clients"] = np.where(trained > 0, np.nansum(local, 0) / np.maximum(trained, 1), np.nan)
        if server is not None and "loss_server" in server:
            out["server"], out["server_rounds"] = _by_round(server, "loss_server", n), out["rounds"]
    return out


def _windows(losses: np.ndarray, steps: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The losses (by round, as :func:`loss_curves` gives them) of the first,
    second-to-last and last WINDOW of rounds: chosen by round number, not by position
    among the rows, which skip idle or lost rounds. ``steps``: optimizer steps a round's
    loss is the mean of (a federated round's E). None for fewer than 100 steps' worth of
    rounds or a window with fewer than 2 losses."""
    n = int(len(losses) * WINDOW)
    windows = tuple(w[~np.isnan(w)] for w in (losses[:n], losses[-2 * n : -n], losses[-n:]))
    return windows if n * steps >= 10 and min(map(len, windows)) >= 2 else None


def loss_change(losses: np.ndarray, steps: int = 1) -> float:
    """How much the loss still falls at the end: the drop of the mean loss from the
    second-to-last WINDOW of rounds to the last one, as a share of its whole drop from
    the first WINDOW to the last (0: flat, 1: all of the fall is still happening). Below
    CONVERGED, or within :func:`loss_change_noise`, the run counts as converged. NaN for
    fewer than 100 steps' worth of rounds (:func:`_windows`)."""
    if (w := _windows(losses, steps)) is None:
        return math.nan
    first, before, last = (x.mean() for x in w)
    return float((before - last) / (first - last))


def loss_change_noise(losses: np.ndarray, steps: int = 1) -> float:
    """The 95% half-width of :func:`loss_change` from the rounds' own scatter: each round
    draws its own steps and noise, so two windows' means differ by chance by about this
    much even when nothing is learned any more (the server's loss, averaged over a wide
    range of steps, scatters several times more than the clients')."""
    if (w := _windows(losses, steps)) is None:
        return math.nan
    first, before, last = w
    error = math.sqrt(before.var(ddof=1) / len(before) + last.var(ddof=1) / len(last))
    return float(1.96 * error / (first.mean() - last.mean()))


def converged(losses: np.ndarray, steps: int = 1) -> bool:
    """The fall still happening is below CONVERGED or cannot be told from the scatter."""
    return loss_change(losses, steps) < max(CONVERGED, loss_change_noise(losses, steps))


def smooth(values: np.ndarray, decay: float = 0.98) -> np.ndarray:
    """Exponential moving average with bias correction (what the loss figure draws); a
    round without a loss (NaN) keeps the average as it was, NaN before the first."""
    out, acc, weight = np.empty(len(values)), 0.0, 0.0
    for i, v in enumerate(values):
        if not math.isnan(v):
            acc, weight = decay * acc + (1 - decay) * v, decay * weight + (1 - decay)
        out[i] = acc / weight if weight else math.nan
    return out
