"""Seeded, stratified, disjoint splits of an ImageDataset."""

from __future__ import annotations

import math

import numpy as np

from moco.data.dataset import ImageDataset

__all__ = ["split", "split_indices"]


def _count(n: int, fraction: float) -> int:
    return int(math.floor(n * fraction + 0.5))


def _check_fraction(label: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{label} must be a number in [0, 1), got {value!r}") from None
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{label} must be in [0, 1), got {value}")
    return value


def split_indices(targets: np.ndarray, *, val_fraction: float = 0.1, test_fraction: float = 0.0,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices (train, val, test) of a stratified random split of labels ``targets`` (shape (N,)).

    Sizes: val = round(N * val_fraction), test = round(N * test_fraction), train = the rest. Method: with
    ``numpy.random.default_rng(seed)``, each class's rows are shuffled; row k of a class of size n_c gets the key
    (k + 0.5) / n_c, and rows are ordered by key (ties broken at random). This interleaves classes in proportion
    to their size, so taking val first and test next gives every class its share within +-1 row. Each part is
    returned sorted ascending (original order). Same ``seed`` and labels -> same split.

    Raises ValueError for fractions outside [0, 1), fractions summing to >= 1, or a requested part that would
    be empty.
    """
    val_fraction = _check_fraction("val_fraction", val_fraction)
    test_fraction = _check_fraction("test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1 to leave training data, "
                         f"got {val_fraction} + {test_fraction}")
    targets = np.asarray(targets).reshape(-1)
    n = len(targets)
    n_val, n_test = _count(n, val_fraction), _count(n, test_fraction)
    n_train = n - n_val - n_test
    for label, frac, size in (("val_fraction", val_fraction, n_val), ("test_fraction", test_fraction, n_test),
                              ("training part", 1.0, n_train)):
        if frac > 0 and size <= 0:
            raise ValueError(f"{label}={frac} leaves an empty part for a dataset of {n} samples; "
                             f"use a larger fraction or more data")
    rng = np.random.default_rng(seed)
    keys = np.empty(n, dtype=np.float64)
    for cls in np.unique(targets):
        rows = np.flatnonzero(targets == cls)
        rows = rows[rng.permutation(len(rows))]
        keys[rows] = (np.arange(len(rows)) + 0.5) / len(rows)
    tiebreak = rng.random(n)
    order = np.lexsort((tiebreak, keys))
    val, test, train = order[:n_val], order[n_val:n_val + n_test], order[n_val + n_test:]
    return np.sort(train), np.sort(val), np.sort(test)


def split(dataset: ImageDataset, *, val_fraction: float = 0.1, test_fraction: float = 0.0,
          seed: int = 0) -> tuple[ImageDataset, ...]:
    """Split ``dataset`` into disjoint parts: (train, val), or (train, val, test) when ``test_fraction > 0``.

    Stratified by label and seeded (see :func:`split_indices` for sizes and method): val holds
    round(N * val_fraction) rows, test round(N * test_fraction), train the rest; each part keeps the original row
    order and the dataset's name, classes, mean/std and normalize setting. Raises ValueError for bad fractions.
    """
    train, val, test = split_indices(dataset.targets.numpy(), val_fraction=val_fraction,
                                     test_fraction=test_fraction, seed=seed)
    parts = [dataset.subset(train), dataset.subset(val)]
    if float(test_fraction) > 0:
        parts.append(dataset.subset(test))
    return tuple(parts)
