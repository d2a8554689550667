"""Deterministic stratified splits and subsamples: each class is divided in the same proportions.

    >>> train_idx, val_idx, test_idx = stratified_split(ds.labels, (0.8, 0.1, 0.1), seed=0)
    >>> train, val, test = split_dataset(ds, (0.8, 0.1, 0.1), seed=0)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["stratified_split", "stratified_sample", "split_dataset", "train_val_test"]


def _check_fractions(fractions: Sequence[float]) -> np.ndarray:
    f = np.asarray(fractions, dtype=np.float64)
    if f.ndim != 1 or len(f) == 0 or (f < 0).any() or abs(f.sum() - 1) > 1e-9:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {list(fractions)}")
    return f


def stratified_split(labels: Sequence[int], fractions: Sequence[float] = (0.8, 0.1, 0.1),
                     seed: int = 0) -> list[np.ndarray]:
    """Partition example indices into len(fractions) sorted, disjoint index arrays.

    Every class is shuffled (by `seed`) and cut at floor(cumulative fraction * class size + 0.5),
    so each part holds its fraction of every class to within one example (the rounding
    errors of different classes can add up in a part's total size).
    """
    fractions = _check_fractions(fractions)
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[np.empty(0, np.int64)] for _ in fractions]
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        cuts = np.floor(np.cumsum(fractions)[:-1] * len(members) + 0.5).astype(np.int64)
        for part, piece in zip(parts, np.split(members, cuts)):
            part.append(piece)
    return [np.sort(np.concatenate(p)) for p in parts]


def stratified_sample(labels: Sequence[int], n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of `n` examples drawn (by `seed`) in proportion to class sizes.

    Quotas are n * class share, rounded down, with the remainder given to the classes with
    the largest fractional parts (ties to the lower class id).
    """
    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    exact = n * counts / len(labels)
    quota = np.floor(exact).astype(np.int64)
    leftover = n - quota.sum()
    quota[np.argsort(-(exact - quota), kind="stable")[:leftover]] += 1
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(labels == c), size=q, replace=False) for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(picked))


def split_dataset(dataset, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> list:
    """`stratified_split` applied to a dataset with `.labels` and `.subset(indices)`."""
    return [dataset.subset(idx) for idx in stratified_split(dataset.labels, fractions, seed)]


def train_val_test(dataset, val_fraction: float, test_fraction: float, seed: int = 0) -> list:
    """(train, validation, test) by `split_dataset`, train taking what the other two leave."""
    return split_dataset(dataset, (1.0 - val_fraction - test_fraction, val_fraction, test_fraction), seed=seed)
