"""Splitting a dataset across K clients, reproducibly from a seed.

Rules (each returns K sorted index arrays into the catalog):
- ``iid``: a shuffled even split.
- ``class``: classes dealt out in contiguous blocks (each client has its own classes).
- ``dirichlet``: label skew; each class is split across clients in proportions
  drawn from Dirichlet(alpha) (small alpha: very skewed).
- ``attributes``: as in the authors' CelebA/CUB setups, client k keeps the images
  where any attribute of its group is 1. ``overlap`` lets an image go to every
  qualifying client; ``exclusive`` gives it to one of them, chosen at random.
Then :func:`train_test` splits each client's pool (official split when the
dataset has one) and caps the sizes.
"""

from __future__ import annotations

import numpy as np

RULES = ("iid", "class", "dirichlet", "attributes")


def iid(n: int, clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [np.sort(p) for p in np.array_split(rng.permutation(n), clients)]


def by_class(labels: np.ndarray, clients: int) -> list[np.ndarray]:
    classes = np.unique(labels)
    if clients > len(classes):
        raise ValueError(f"partition 'class' needs at most {len(classes)} clients (one class each), got {clients}")
    return [np.flatnonzero(np.isin(labels, group)) for group in np.array_split(classes, clients)]


def dirichlet(labels: np.ndarray, clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    if alpha <= 0:
        raise ValueError(f"Dirichlet alpha must be > 0, got {alpha}")
    parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha)))[:-1] * len(idx)).astype(int)
        for k, chunk in enumerate(np.split(idx, cuts)):
            parts[k].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def by_attributes(
    attributes: np.ndarray, names: list[str], groups: list[list[str]], exclusive: bool, rng: np.random.Generator
) -> list[np.ndarray]:
    """Client k keeps images where any attribute in ``groups[k]`` is 1."""
    unknown = sorted({a for g in groups for a in g} - set(names))
    if unknown:
        raise ValueError(f"unknown attribute(s) {unknown}; valid: {names}")
    member = np.stack([attributes[:, [names.index(a) for a in g]].any(axis=1) for g in groups], axis=1)
    if exclusive:  # one owner per image, uniformly among the qualifying clients
        score = np.where(member, rng.random(member.shape), -1.0)
        owner = score.argmax(axis=1)
        member = np.zeros_like(member)
        qualified = score.max(axis=1) >= 0
        member[np.flatnonzero(qualified), owner[qualified]] = True
    return [np.flatnonzero(member[:, k]) for k in range(len(groups))]


def train_test(
    pool: np.ndarray,
    official: np.ndarray | None,
    test_fraction: float,
    train_size: int,
    test_size: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Split one client's pool: the official split when given, else a random
    ``test_fraction``; then keep at most ``train_size`` / ``test_size`` (0 = all)."""
    if official is not None:
        train, test = pool[official[pool] == "train"], pool[official[pool] == "test"]
    else:
        shuffled = rng.permutation(pool)
        n_test = max(1, int(round(len(pool) * test_fraction))) if test_fraction > 0 and len(pool) > 1 else 0
        test, train = shuffled[:n_test], shuffled[n_test:]

    def cap(idx: np.ndarray, size: int) -> np.ndarray:
        return np.sort(rng.choice(idx, size, replace=False) if 0 < size < len(idx) else idx)

    return cap(train, train_size), cap(test, test_size)
