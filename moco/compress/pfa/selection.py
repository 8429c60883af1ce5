"""PFA unit selection: which units of a layer to keep, from the Pearson correlations of their responses.

Units whose variance is below ``inactive_epsilon`` x the layer's largest unit variance are *inactive*
(e.g. dead ReLUs) and are removed first. Among the active units, correlations
``|corr_ij| = |cov_ij| / sqrt(var_i var_j)`` drive an iterative removal until the recommended number
is left (removing a unit does not change the correlations of the others, so it is just masked):

* :class:`AbsMax`: take the pair with the largest ``|corr|``; remove the member whose remaining
  coefficients, sorted in descending order, are larger (compared one by one: the second largest, then
  the third, ...); a full tie removes the lower index.
* :class:`AbsMin`: the mirror image: the pair with the smallest ``|corr|``; remove the member whose
  ascending coefficients are smaller.
* :class:`L1Max` / :class:`L1Min`: remove the unit with the largest / smallest sum of ``|corr|`` to the
  other remaining units (ties: the one with the most extreme single coefficient, then the lower index).

If fewer units are active than the recipe keeps, all active units are kept and the remaining places go
to the inactive units with the largest variance, so exactly the recommended number is returned.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moco.errors import MocoError

__all__ = ["AbsMax", "AbsMin", "L1Max", "L1Min", "abs_correlation", "inactive_units"]

_TIE = 1e-12


def _covariance(covariance) -> np.ndarray:
    cov = np.asarray(covariance, dtype=np.float64)
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1] or cov.shape[0] == 0:
        raise MocoError(f"covariance must be a non-empty square [units, units] matrix, got shape {cov.shape}")
    if not np.isfinite(cov).all():
        raise MocoError("covariance contains NaN or inf")
    return cov


def inactive_units(covariance, epsilon: float = 1e-6) -> np.ndarray:
    """Sorted indices of units whose variance is <= ``epsilon`` x the largest variance (all if none varies)."""
    var = np.diag(_covariance(covariance))
    top = float(var.max())
    return np.flatnonzero(var <= epsilon * top) if top > 0 else np.arange(var.size)


def abs_correlation(covariance) -> np.ndarray:
    """``|Pearson correlation|`` matrix from a covariance; entries of zero-variance units are 0, diagonal 1."""
    cov = _covariance(covariance)
    sd = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    denom = np.outer(sd, sd)
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = np.where(denom > 0, np.abs(cov) / np.where(denom > 0, denom, 1.0), 0.0)
    corr = np.clip(corr, 0.0, 1.0)
    np.fill_diagonal(corr, 1.0)
    return corr


def _first_difference(a: np.ndarray, b: np.ndarray) -> int:
    """Sign of the first element where two equally long sequences differ by more than a tie tolerance."""
    diff = a - b
    idx = np.flatnonzero(np.abs(diff) > _TIE)
    return 0 if idx.size == 0 else (1 if diff[idx[0]] > 0 else -1)


def _select_abs(corr: np.ndarray, keep: int, largest: bool) -> np.ndarray:
    """Indices (into ``corr``) of the ``keep`` units left after iterative pair-wise removal."""
    n = corr.shape[0]
    work = corr.copy()
    np.fill_diagonal(work, np.nan)
    alive = np.ones(n, dtype=bool)
    triu = np.triu(np.ones((n, n), dtype=bool), 1)
    for _ in range(n - keep):
        upper = np.where(triu & alive[:, None] & alive[None, :], work, np.nan)
        val = np.nanmax(upper) if largest else np.nanmin(upper)
        cand = np.argwhere(np.abs(upper - val) <= _TIE)  # row-major: the first pair (i < j) wins ties
        i, j = (int(cand[0, 0]), int(cand[0, 1]))
        others = alive.copy()
        others[[i, j]] = False
        ri, rj = np.sort(work[i, others]), np.sort(work[j, others])
        if largest:
            ri, rj = ri[::-1], rj[::-1]
            drop = j if _first_difference(rj, ri) > 0 else i
        else:
            drop = j if _first_difference(rj, ri) < 0 else i
        alive[drop] = False
    return np.flatnonzero(alive)


def _select_l1(corr: np.ndarray, keep: int, largest: bool) -> np.ndarray:
    n = corr.shape[0]
    work = corr.copy()
    np.fill_diagonal(work, 0.0)
    alive = np.ones(n, dtype=bool)
    for _ in range(n - keep):
        sub = work[np.ix_(alive, alive)]
        l1 = sub.sum(axis=0)
        idx = np.flatnonzero(alive)
        val = l1.max() if largest else l1.min()
        tied = np.flatnonzero(np.abs(l1 - val) <= 1e-9 * max(1.0, abs(val)))
        if tied.size > 1 and sub.shape[0] > 1:
            extreme = sub[:, tied].copy()
            extreme[tied, np.arange(tied.size)] = np.nan  # not a unit's correlation with itself
            best = np.nanmax(extreme, axis=0) if largest else np.nanmin(extreme, axis=0)
            target = best.max() if largest else best.min()
            tied = tied[np.abs(best - target) <= _TIE]
        alive[idx[tied[0]]] = False
    return np.flatnonzero(alive)


@dataclass(frozen=True)
class _Selection:
    inactive_epsilon: float = 1e-6

    _largest = True
    _pairwise = True

    def __post_init__(self) -> None:
        eps = self.inactive_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < 1:
            raise MocoError(f"inactive_epsilon is a fraction of the largest variance in [0, 1), got {eps!r}")

    @property
    def name(self) -> str:
        """The strategy's name, e.g. ``"AbsMax"``."""
        return type(self).__name__

    def select(self, covariance, keep: int) -> np.ndarray:
        """Sorted int64 indices of the ``keep`` units to keep, from a ``[units, units]`` covariance."""
        cov = _covariance(covariance)
        n = cov.shape[0]
        if isinstance(keep, bool) or not isinstance(keep, (int, np.integer)) or not 1 <= keep <= n:
            raise MocoError(f"the number of units to keep must be an int in [1, {n}], got {keep!r}")
        inactive = inactive_units(cov, self.inactive_epsilon)
        active = np.setdiff1d(np.arange(n), inactive)
        if active.size <= keep:
            var = np.diag(cov)[inactive]
            extra = inactive[np.argsort(-var, kind="stable")[: keep - active.size]]
            return np.sort(np.concatenate([active, extra])).astype(np.int64)
        corr = abs_correlation(cov)[np.ix_(active, active)]
        pick = _select_abs if self._pairwise else _select_l1
        return active[pick(corr, int(keep), self._largest)].astype(np.int64)


@dataclass(frozen=True)
class AbsMax(_Selection):
    """Remove a member of the most correlated pair, iteratively (ties broken by the next coefficients)."""


@dataclass(frozen=True)
class AbsMin(_Selection):
    """Remove a member of the least correlated pair, iteratively (the mirror image of AbsMax)."""

    _largest = False


@dataclass(frozen=True)
class L1Max(_Selection):
    """Remove the unit with the largest sum of |correlations| to the remaining units, iteratively."""

    _pairwise = False


@dataclass(frozen=True)
class L1Min(_Selection):
    """Remove the unit with the smallest sum of |correlations| to the remaining units, iteratively."""

    _largest = False
    _pairwise = False
