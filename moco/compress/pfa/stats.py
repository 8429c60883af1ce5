"""Streaming count, mean and covariance of pooled layer responses, in float64 (Chan's parallel update).

Each batch ``[B, units]`` is centred on its own mean before its scatter matrix is formed, and batch
statistics are merged with Chan et al.'s pairwise update::

    n = na + nb;  d = mean_b - mean_a
    mean = mean_a + d * nb / n
    M2   = M2_a + M2_b + outer(d, d) * na * nb / n

so no raw sums of squares are ever accumulated: responses with a large mean (e.g. 1e6 + small noise)
keep their covariance to float64 precision, where ``E[x x^T] - E[x] E[x]^T`` would cancel to noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moco.errors import MocoError

__all__ = ["LayerStatistics", "RunningCovariance"]


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.array(a, dtype=np.float64, copy=True)
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class LayerStatistics:
    """Second-order statistics of one layer's pooled responses (all float64, read-only arrays).

    Attributes:
        count: number of samples seen.
        mean: ``[units]`` mean response.
        covariance: ``[units, units]`` sample covariance (divided by ``count - 1``, as ``numpy.cov``).
        eigenvalues: ``[units]`` eigenvalues of ``covariance`` (``numpy.linalg.eigvalsh``), clipped at 0
            and sorted in descending order.
    """

    count: int
    mean: np.ndarray
    covariance: np.ndarray
    eigenvalues: np.ndarray

    @property
    def units(self) -> int:
        """Number of units (channels or features) of the layer."""
        return int(self.mean.shape[0])

    @property
    def variances(self) -> np.ndarray:
        """``[units]`` per-unit variances (the covariance diagonal)."""
        return np.diag(self.covariance)

    def inactive_units(self, epsilon: float = 1e-6) -> np.ndarray:
        """Indices of units whose variance is below ``epsilon`` x the largest unit variance (sorted)."""
        var = self.variances
        top = float(var.max()) if var.size else 0.0
        return np.flatnonzero(var <= epsilon * top) if top > 0 else np.arange(var.size)

    @classmethod
    def from_covariance(cls, covariance: np.ndarray, *, count: int = 0, mean: np.ndarray | None = None) -> "LayerStatistics":
        """Statistics from a known covariance matrix (e.g. a hand-made one); eigenvalues are computed."""
        cov = np.asarray(covariance, dtype=np.float64)
        if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
            raise MocoError(f"covariance must be a square [units, units] matrix, got shape {cov.shape}")
        if not np.isfinite(cov).all():
            raise MocoError("covariance contains NaN or inf")
        if not np.allclose(cov, cov.T, rtol=1e-8, atol=1e-12 * max(1.0, float(np.abs(cov).max(initial=0.0)))):
            raise MocoError("covariance must be symmetric")
        cov = (cov + cov.T) / 2
        m = np.zeros(cov.shape[0]) if mean is None else np.asarray(mean, dtype=np.float64)
        if m.shape != (cov.shape[0],):
            raise MocoError(f"mean must have shape ({cov.shape[0]},), got {m.shape}")
        eig = np.clip(np.linalg.eigvalsh(cov), 0.0, None)[::-1]
        return cls(int(count), _readonly(m), _readonly(cov), _readonly(eig))


class RunningCovariance:
    """Accumulates count, mean and the centred scatter matrix ``M2`` of ``[B, units]`` batches in float64.

    ``update(batch)`` merges one batch (Chan's update); ``merge(other)`` merges another accumulator;
    ``covariance()`` is ``M2 / (count - 1)``. Memory is O(units^2), independent of the sample count.
    """

    def __init__(self, units: int | None = None):
        self.count = 0
        self.units = units
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None

    def _check(self, units: int) -> None:
        if self.units is None:
            self.units = units
        elif units != self.units:
            raise MocoError(f"a batch has {units} units but earlier batches had {self.units}; keep the layer's width fixed")

    def _merge(self, nb: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        if nb == 0:
            return
        if self.count == 0 or self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = nb, mean_b.copy(), m2_b.copy()
            return
        na = self.count
        n = na + nb
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2_b + np.outer(delta, delta) * (na * nb / n)
        self.count = n

    def update(self, batch) -> "RunningCovariance":
        """Merge a ``[B, units]`` batch (any real dtype; converted to float64). Returns self."""
        x = np.asarray(batch, dtype=np.float64)
        if x.ndim != 2:
            raise MocoError(f"responses must be [samples, units], got shape {x.shape}; pool feature maps first")
        self._check(x.shape[1])
        if x.shape[0] == 0:
            return self
        mean_b = x.mean(axis=0)
        xc = x - mean_b
        self._merge(x.shape[0], mean_b, xc.T @ xc)
        return self

    def merge(self, other: "RunningCovariance") -> "RunningCovariance":
        """Merge another accumulator over the same units (e.g. from another worker). Returns self."""
        if other.count == 0:
            return self
        self._check(int(other.units))  # type: ignore[arg-type]
        assert other.mean is not None and other.m2 is not None
        self._merge(other.count, other.mean, other.m2)
        return self

    def covariance(self) -> np.ndarray:
        """Sample covariance ``M2 / (count - 1)`` (float64 ``[units, units]``); needs count >= 2."""
        if self.count < 2 or self.m2 is None:
            raise MocoError(f"a covariance needs at least 2 samples, got {self.count}")
        return self.m2 / (self.count - 1)

    def statistics(self) -> LayerStatistics:
        """The :class:`LayerStatistics` (eigenvalues clipped at 0, descending)."""
        cov = self.covariance()
        cov = (cov + cov.T) / 2
        eig = np.clip(np.linalg.eigvalsh(cov), 0.0, None)[::-1]
        assert self.mean is not None
        return LayerStatistics(int(self.count), _readonly(self.mean), _readonly(cov), _readonly(eig))
