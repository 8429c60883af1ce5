"""PFA recipes: how many units each layer should keep, from the eigenvalue spectrum of its responses.

* :class:`Energy` keeps, per layer, the fewest leading eigenvalues whose energy (sum) reaches a fraction
  of the layer's total;
* :class:`KL` needs no parameter: with ``p`` the normalised spectrum of ``n`` eigenvalues, it keeps
  ``ceil(n * H(p) / log n)`` units, i.e. ``n * (1 - KL(p || uniform) / log n)``: all units for a flat
  spectrum, one unit when a single eigenvalue carries everything;
* :class:`Size` finds one energy threshold shared by all layers (bisection) such that about
  ``relative_size`` of all units are kept.

Every count is at least 1 and at most the layer's width. Spectra are 1-D arrays of non-negative
eigenvalues in descending order (:attr:`LayerStatistics.eigenvalues`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from moco.errors import MocoError

__all__ = ["KL", "Energy", "Size", "energy_count", "kl_count", "kl_divergence", "kept_energy", "linear_interpolation",
           "size_threshold"]

_TOL = 1e-12  # cumulative-energy comparisons on normalised spectra
_CEIL_TOL = 1e-9  # n * H / log n that is an integer up to rounding is not rounded up


def _spectrum(eigenvalues) -> np.ndarray:
    e = np.asarray(eigenvalues, dtype=np.float64)
    if e.ndim != 1 or e.size == 0:
        raise MocoError(f"a spectrum must be a non-empty 1-D array of eigenvalues, got shape {e.shape}")
    if not np.isfinite(e).all():
        raise MocoError("the spectrum contains NaN or inf")
    if (e < 0).any():
        raise MocoError("eigenvalues must be non-negative (clip covariance eigenvalues at 0)")
    return np.sort(e)[::-1]


def _check_min_kept(min_kept_count) -> int:
    if isinstance(min_kept_count, bool) or not isinstance(min_kept_count, (int, np.integer)) or min_kept_count < 0:
        raise MocoError(f"min_kept_count must be an int >= 0, got {min_kept_count!r}")
    return int(min_kept_count)


def _cumulative(e: np.ndarray) -> np.ndarray | None:
    total = float(e.sum())
    return None if total <= 0 else np.cumsum(e) / total


def energy_count(eigenvalues, threshold: float, min_kept_count: int = 0) -> int:
    """Smallest k whose k largest eigenvalues hold at least ``threshold`` (a fraction) of the energy.

    Raised to ``min_kept_count`` and to at least 1, capped at the number of eigenvalues. A spectrum of
    zeros keeps ``max(1, min_kept_count)`` units.
    """
    e = _spectrum(eigenvalues)
    cum = _cumulative(e)
    k = 1 if cum is None else int(np.searchsorted(cum, threshold - _TOL, side="left")) + 1
    return int(min(max(k, min_kept_count, 1), e.size))


def kept_energy(eigenvalues, count: int) -> float:
    """Fraction (0..1) of the spectral energy in the ``count`` largest eigenvalues (1.0 for all zeros)."""
    e = _spectrum(eigenvalues)
    total = float(e.sum())
    return 1.0 if total <= 0 else float(e[: int(count)].sum() / total)


def kl_divergence(eigenvalues) -> float:
    """KL(p || uniform) in nats of the normalised spectrum ``p``: ``log n - H(p)`` (0 for a flat one).

    Its maximum, ``log n``, is reached when one eigenvalue carries all the energy. All zeros -> ``log n``.
    """
    e = _spectrum(eigenvalues)
    n = e.size
    total = float(e.sum())
    if total <= 0:
        return math.log(n)
    p = e[e > 0] / total
    entropy = float(-(p * np.log(p)).sum())
    return max(0.0, math.log(n) - entropy)


def linear_interpolation(kl_divergence: float, max_kl_divergence: float) -> float:
    """DNIKit's default KL interpolation: the units ratio ``1 - kl_divergence / max_kl_divergence``."""
    return 1.0 - kl_divergence / max_kl_divergence


def kl_count(eigenvalues, min_kept_count: int = 1, interpolation_function=None) -> int:
    """Units the KL recipe keeps: ``ceil(n * ratio)``, at least 1 (and ``min_kept_count``).

    ``ratio = interpolation_function(KL(p || uniform), log n)``; the default (linear) gives
    ``1 - KL / log n = H(p) / log n``. A custom function must return a ratio in [0, 1].
    """
    e = _spectrum(eigenvalues)
    n = e.size
    if n == 1:
        return 1
    interpolate = linear_interpolation if interpolation_function is None else interpolation_function
    ratio = interpolate(kl_divergence(e), math.log(n))
    try:
        ratio = float(ratio)
    except (TypeError, ValueError):
        raise MocoError(f"interpolation_function must return a number (a units ratio in [0, 1]), got {ratio!r}") from None
    if not 0.0 <= ratio <= 1.0 + 1e-12:
        raise MocoError(f"interpolation_function returned the units ratio {ratio!r}; it must lie in [0, 1]")
    k = math.ceil(n * ratio - _CEIL_TOL)
    return int(min(max(k, min_kept_count, 1), n))


def size_threshold(spectra: Mapping[str, np.ndarray], relative_size: float, min_kept_count: int = 0,
                   *, iterations: int = 60) -> float:
    """One energy threshold (0..1) for all layers so that the kept total is closest to ``relative_size`` x all units.

    ``sum_l energy_count(spectrum_l, t)`` is non-decreasing in ``t``; bisection finds the jump that
    crosses the target ``relative_size * sum_l n_l`` and the side closer to it wins (ties: the larger).
    """
    if not spectra:
        raise MocoError("no layer spectra to size; introspect at least one layer")
    cums = {}
    sizes = {}
    for name, eig in spectra.items():
        e = _spectrum(eig)
        cums[name] = _cumulative(e)
        sizes[name] = e.size
    target = relative_size * sum(sizes.values())

    def total(t: float) -> int:
        s = 0
        for name, cum in cums.items():
            k = 1 if cum is None else int(np.searchsorted(cum, t - _TOL, side="left")) + 1
            s += min(max(k, min_kept_count, 1), sizes[name])
        return s

    if total(0.0) >= target:
        return 0.0
    if total(1.0) <= target:
        return 1.0
    lo, hi = 0.0, 1.0  # total(lo) < target <= total(hi)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if total(mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi if (total(hi) - target) <= (target - total(lo)) else lo


def _check_fraction(name: str, value, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise MocoError(f"{name} must be a number in {'[0' if allow_zero else '(0'}, 1], got {value!r}")
    v = float(value)
    if not ((0.0 <= v if allow_zero else 0.0 < v) and v <= 1.0):
        raise MocoError(f"{name} is a fraction in {'[0' if allow_zero else '(0'}, 1] (e.g. 0.99), got {value!r}")
    return v


@dataclass(frozen=True)
class Energy:
    """Keep, per layer, the fewest units whose eigenvalues hold ``energy_threshold`` of the energy.

    Args:
        energy_threshold: fraction of the spectral energy to keep, in [0, 1] (e.g. 0.99).
        min_kept_count: keep at least this many units per layer (the threshold may then be exceeded).
    """

    energy_threshold: float
    min_kept_count: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "energy_threshold", _check_fraction("energy_threshold", self.energy_threshold, allow_zero=True))
        object.__setattr__(self, "min_kept_count", _check_min_kept(self.min_kept_count))

    @property
    def name(self) -> str:
        """Label used in tables: ``"PFA Energy(0.99)"``."""
        return f"PFA Energy({self.energy_threshold:g})"

    def recommend(self, spectra: Mapping[str, np.ndarray]) -> tuple[dict[str, int], float | None]:
        """``({layer: units to keep}, energy threshold used)``."""
        return ({k: energy_count(e, self.energy_threshold, self.min_kept_count) for k, e in spectra.items()},
                self.energy_threshold)


@dataclass(frozen=True)
class KL:
    """Parameter-free recipe: keep ``ceil(n * (1 - KL(p || uniform) / log n))`` units per layer.

    Args:
        min_kept_count: keep at least this many units per layer (default 1).
        interpolation_function: DNIKit's hook: ``f(kl_divergence, max_kl_divergence) -> units ratio``
            (None: :func:`linear_interpolation`, ``1 - kl / max``, DNIKit's default).
    """

    min_kept_count: int = 1
    interpolation_function: Callable[[float, float], float] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "min_kept_count", _check_min_kept(self.min_kept_count))
        if self.interpolation_function is not None and not callable(self.interpolation_function):
            raise TypeError("interpolation_function must be a callable (kl_divergence, max_kl_divergence) -> ratio, "
                            f"got {type(self.interpolation_function).__name__}")

    @property
    def name(self) -> str:
        """Label used in tables: ``"PFA KL"``."""
        return "PFA KL"

    def recommend(self, spectra: Mapping[str, np.ndarray]) -> tuple[dict[str, int], float | None]:
        """``({layer: units to keep}, None)``."""
        return {k: kl_count(e, self.min_kept_count, self.interpolation_function) for k, e in spectra.items()}, None


@dataclass(frozen=True)
class Size:
    """Keep about ``relative_size`` of all units, with one energy threshold shared by every layer.

    Args:
        relative_size: fraction of all analysed units to keep, in (0, 1] (e.g. 0.5 halves the widths
            on average; layers with flatter spectra keep more).
        min_kept_count: keep at least this many units per layer.
        epsilon_energy: the shared threshold is kept inside ``[epsilon_energy, 1 - epsilon_energy]``
            (DNIKit's argument and default, 1e-8).
    """

    relative_size: float
    min_kept_count: int = 0
    epsilon_energy: float = 1e-8

    def __post_init__(self) -> None:
        object.__setattr__(self, "relative_size", _check_fraction("relative_size", self.relative_size, allow_zero=False))
        object.__setattr__(self, "min_kept_count", _check_min_kept(self.min_kept_count))
        eps = self.epsilon_energy
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < 0.5:
            raise MocoError(f"epsilon_energy must be a number in [0, 0.5), got {eps!r}")

    @property
    def name(self) -> str:
        """Label used in tables: ``"PFA Size(0.5)"``."""
        return f"PFA Size({self.relative_size:g})"

    def recommend(self, spectra: Mapping[str, np.ndarray]) -> tuple[dict[str, int], float | None]:
        """``({layer: units to keep}, the shared energy threshold)``."""
        t = size_threshold(spectra, self.relative_size, self.min_kept_count)
        t = min(max(t, self.epsilon_energy), 1.0 - self.epsilon_energy)
        return {k: energy_count(e, t, self.min_kept_count) for k, e in spectra.items()}, t
