"""Choosing a firing threshold with a certified error rate among the samples that fire.

Candidate thresholds come from the *fit* split (quantiles of its scores), so they do not depend on the
held-out samples. They are tested on the held-out split by **fixed-sequence testing** (as in
Learn-then-Test): from the strictest candidate to the loosest, each at the full level, stopping at the
first that fails; the null hypothesis of candidate ``t`` is "the error rate among samples with
``score > t`` exceeds ``max_error``", tested with a one-sided Clopper-Pearson bound. One unlucky error
early in a single sequence would end it, so ``starts`` sequences run, each at level
``(1 - confidence) / starts`` (union bound) and starting where the fit split expects 1.5x, 3x, 6x, ...
the held-out samples that certification needs at all: start points fixed before the held-out data is
looked at. The loosest threshold any sequence certifies is chosen. With probability at least
``confidence``, its true error rate among fired samples is at most ``max_error``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moco.errors import MocoError
from moco.stats import clopper_pearson_upper, min_samples_for

__all__ = ["ThresholdChoice", "select_threshold"]


@dataclass(frozen=True)
class ThresholdChoice:
    """The chosen threshold (``inf`` when none passes) and its held-out evidence."""

    threshold: float
    fired: int  # held-out samples that fire
    errors: int  # ... of which would be wrong exits
    error_bound: float  # certified upper bound on the error rate among fired samples (1.0 if none)
    needed: int  # error-free held-out samples needed to certify max_error at all
    tested: int  # candidates tested before the sequence stopped

    @property
    def certified(self) -> bool:
        return self.fired > 0


def select_threshold(
    val_scores: np.ndarray,
    val_wrong: np.ndarray,
    fit_scores: np.ndarray,
    *,
    max_error: float,
    confidence: float = 0.95,
    grid: int = 200,
    max_fraction: float = 1.0,
    starts: int = 4,
    what: str = "samples",
) -> ThresholdChoice:
    """Loosest threshold ``t`` (fire where ``score > t``) certified to err at most ``max_error`` among fired.

    ``val_wrong[i]`` says held-out sample i would be a wrong exit if it fired. ``fit_scores`` are the
    same scores on the fit split (``-inf`` where a sample can never fire); ``max_fraction`` caps the
    fraction of samples a candidate may fire on (e.g. the share predicted as the rule's class).
    Raises ``MocoError`` when the held-out set is too small to ever certify ``max_error``.
    """
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float, np.floating)) or not 0 < confidence < 1:
        raise MocoError(f"confidence must be in (0, 1), got {confidence!r}")  # before it is split over the starts
    val_scores = np.asarray(val_scores, dtype=np.float64)
    val_wrong = np.asarray(val_wrong, dtype=bool)
    fit_scores = np.asarray(fit_scores, dtype=np.float64)
    if val_scores.shape != val_wrong.shape or val_scores.ndim != 1:
        raise MocoError("scores and wrong must be 1-D arrays of the same length")
    reachable = int(len(val_scores) * max_fraction)
    # as many sequences as can start within reach (a choice that does not look at held-out labels)
    for starts in range(max(1, starts), 0, -1):
        level = 1.0 - (1.0 - confidence) / starts
        needed = min_samples_for(max_error, level)
        if 1.5 * 2 ** (starts - 1) * needed <= reachable:
            break
    if reachable < needed:
        raise MocoError(
            f"too few held-out {what} to certify max_error={max_error} at confidence {confidence}: "
            f"need at least {needed} that fire without error, have {reachable}; raise max_error, lower "
            f"confidence or give more data"
        )
    finite = np.sort(fit_scores[np.isfinite(fit_scores)])[::-1]
    best = ThresholdChoice(float("inf"), 0, 0, 1.0, needed, 0)
    if len(finite) == 0:
        return best
    n_fit = len(fit_scores)
    top = max(1, min(len(finite), int(round(max_fraction * n_fit))))
    counts = np.unique(np.linspace(1, top, grid).round().astype(int))
    candidates = finite[counts - 1]  # strict -> loose; firing on about counts/n_fit of the samples
    expected_val = counts / n_fit * len(val_scores)
    order = np.argsort(-val_scores, kind="stable")
    sorted_val = val_scores[order]
    cum_wrong = np.concatenate([[0], np.cumsum(val_wrong[order])])
    tested = 0
    first_starts = sorted({int(np.searchsorted(expected_val, 1.5 * 2**k * needed)) for k in range(starts)})
    for start in first_starts:
        for t in candidates[start:]:
            tested += 1
            fired = int(np.searchsorted(-sorted_val, -t, side="left"))  # count of val scores > t
            errors = int(cum_wrong[fired])
            bound = float(clopper_pearson_upper(errors, fired, level)) if fired else 1.0
            if bound > max_error:
                break
            if fired > best.fired:
                best = ThresholdChoice(float(t), fired, errors, bound, needed, 0)
    return ThresholdChoice(best.threshold, best.fired, best.errors, best.error_bound, needed, tested)
