"""Certified bounds shared by the methods that promise an error rate (rules, calibrated exits).

All bounds are exact one-sided binomial (Clopper-Pearson) bounds: with probability at least
``confidence`` over the draw of the held-out samples, the true rate lies on the stated side.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import beta

from moco.errors import MocoError

__all__ = ["clopper_pearson_lower", "clopper_pearson_upper", "min_samples_for"]


def _check(k, n, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    if not 0.0 < confidence < 1.0:
        raise MocoError(f"confidence must be in (0, 1), got {confidence}")
    k_arr, n_arr = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64)
    if np.any(n_arr < 0) or np.any(k_arr < 0) or np.any(k_arr > n_arr):
        raise MocoError(f"need 0 <= k <= n, got k={k}, n={n}")
    return k_arr, n_arr


def clopper_pearson_upper(k, n, confidence: float = 0.95):
    """Upper bound on a rate after ``k`` events in ``n`` trials (1.0 where ``n == 0``). Vectorised."""
    k_arr, n_arr = _check(k, n, confidence)
    with np.errstate(invalid="ignore", divide="ignore"):
        ub = beta.ppf(confidence, k_arr + 1, np.maximum(n_arr - k_arr, 1e-300))
    ub = np.where((k_arr >= n_arr) | (n_arr == 0), 1.0, ub)
    return float(ub) if ub.ndim == 0 else ub


def clopper_pearson_lower(k, n, confidence: float = 0.95):
    """Lower bound on a rate after ``k`` events in ``n`` trials (0.0 where ``k == 0``). Vectorised."""
    k_arr, n_arr = _check(k, n, confidence)
    with np.errstate(invalid="ignore", divide="ignore"):
        lb = beta.ppf(1.0 - confidence, np.maximum(k_arr, 1e-300), n_arr - k_arr + 1)
    lb = np.where(k_arr <= 0, 0.0, lb)
    return float(lb) if lb.ndim == 0 else lb


def min_samples_for(max_error: float, confidence: float = 0.95) -> int:
    """Fewest error-free held-out samples needed to certify an error rate <= ``max_error``.

    Solves ``1 - (1 - confidence) ** (1 / n) <= max_error`` (the Clopper-Pearson bound for 0 errors).
    """
    if not 0.0 < max_error < 1.0:
        raise MocoError(f"max_error must be in (0, 1), got {max_error}")
    if not 0.0 < confidence < 1.0:
        raise MocoError(f"confidence must be in (0, 1), got {confidence}")
    return int(math.ceil(math.log(1.0 - confidence) / math.log(1.0 - max_error)))
