"""Approximate signed 8-bit multipliers: error maps, exact factorisations, error metrics and an energy model.

An :class:`ApproximateMultiplier` is seed 002's dataclass ``(name, performance_metric, error_map)``.
Operands are signed int8 (two's complement, ``-128 .. 127``); the first operand ``a`` is the
activation, the second ``b`` the weight.

Sign convention
---------------
``error_map[a + 128][b + 128] = a * b - approx(a, b)`` (exact minus approximate), as in seed 002's
tutorial. The reference library's own helper returns the opposite sign (approximate minus exact);
negate such a table before passing it here. ``approx_table = exact - error_map``.

Built-in library (:func:`library`), written from the published definitions
-------------------------------------------------------------------------
* ``exact``: the exact product.
* ``trunc{k}`` (truncated multiplier; e.g. Schulte & Swartzlander 1993, without the correction
  constant): the partial-product bits ``a_i b_j`` of the Baugh-Wooley array in the ``k`` least
  significant columns (``i + j < k``) are dropped.
* ``bam_h{h}_v{v}`` (broken-array multiplier, Mahdiani et al. 2010): the carry-save cells of the
  ``h`` least significant partial-product rows (horizontal break level, ``j < h``) and of the
  columns ``i + j < v`` (vertical break level) are removed.
* ``drum{k}`` (DRUM, Hashemi, Bahar & Reda 2015): each operand's magnitude keeps the ``k`` bits from
  its leading one, the lowest kept bit forced to 1 (unbiased), the rest zeroed; the two reduced
  magnitudes are multiplied exactly and the sign is applied (sign-magnitude, as the paper's signed
  version).
* ``mitchell`` (Mitchell 1962, logarithmic): ``|a| = 2^k1 (1 + f1)``, ``|b| = 2^k2 (1 + f2)``; the
  product is ``2^(k1+k2) (1 + f1 + f2)`` when ``f1 + f2 < 1``, else ``2^(k1+k2+1) (f1 + f2)``
  (exact integers for 8-bit operands: no fraction bits are dropped), sign applied.

Every partial-product design is a sum of rank-1 bit-slice products, and DRUM is one product of
reduced operands, so each built-in carries an exact integer factorisation
``approx(a, b) = sum_k P[k, a + 128] * Q[k, b + 128]`` (:attr:`ApproximateMultiplier.factors`) that
:mod:`moco.approx.lut` uses to simulate it with a few exact convolutions. Mitchell's map has rank 63
and no such factorisation: it is simulated by the (slower) table-gather kernel.

Energy model (``performance_metric``)
-------------------------------------
One gate-count model for all designs, in static-CMOS transistor counts as a proxy for switched
capacitance: ``AND2 = 6``, ``OR2 = 6``, ``XOR2 = 12``, ``MUX2 = 12``, half adder ``HA = 18``
(XOR + AND), full adder ``FA = 28`` (mirror adder). ``performance_metric`` is a design's count divided
by the count of the exact signed 8x8 Baugh-Wooley array, so ``exact`` is 1.0.

* Partial-product designs (exact, truncated, broken-array): one AND cell per kept partial-product bit
  (Baugh-Wooley's NAND cells cost the same), plus the two constant ones of the Baugh-Wooley form
  (columns 8 and 15), then the adder cells that reduce the kept bits to one row, counted column by
  column from the least significant: a column with ``n >= 3`` bits (its own plus incoming carries)
  uses FAs until at most 2 remain, 2 bits use one HA; each adder passes a carry to the next column.
* DRUM(k), from the paper's block diagram: per operand a sign-magnitude conversion (8 XOR + 8 HA
  incrementer), an 8-bit leading-one detector (8 AND + 8 OR), a 3-bit priority encoder (4 OR) and k
  8:1 steering multiplexers (7 MUX2 each); the k x k unsigned core array (counted as above); a 3-bit
  adder of the shift amounts (3 FA); a 2k-to-16-bit barrel shifter (4 stages x 16 MUX2); the output
  sign conversion (16 XOR + 16 HA).
* Mitchell: per operand the same sign conversion, leading-one detector, encoder and a 7-bit
  normalising barrel shifter (3 stages x 7 MUX2); a 7-bit mantissa adder (7 FA) and a 3-bit
  exponent adder (3 FA); an antilogarithm barrel shifter to 16 bits (4 stages x 16 MUX2); the output
  sign conversion.

At 8 bits the fixed overhead of DRUM and Mitchell (detectors, shifters, sign conversion) outweighs
the small core they save; the model says so rather than being tuned (their papers target 16/32 bits).

Published figures (``PUBLISHED``) are shown beside the model where the design's paper gives a power
figure for a comparable configuration; :func:`energy_table` flags a disagreement over 30%. None of
the papers above publishes a figure for exactly these signed 8-bit configurations, so the table says
which configuration the paper measured and no flag is computed where the configuration differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from moco.errors import MocoError

__all__ = [
    "ApproximateMultiplier",
    "MultiplierStats",
    "CELL_COST",
    "PUBLISHED",
    "operands",
    "exact",
    "truncated",
    "broken_array",
    "drum",
    "mitchell",
    "library",
    "error_stats",
    "error_table",
    "energy_table",
    "plot_error_map",
    "array_cost",
    "pp_mask_approx",
]

#: transistor counts of the cells of the energy model (static CMOS)
CELL_COST: dict[str, int] = {"AND": 6, "OR": 6, "XOR": 12, "MUX": 12, "HA": 18, "FA": 28}

#: published power figures: name prefix -> (what the paper measured, saving as a fraction or None)
PUBLISHED: dict[str, tuple[str, float | None]] = {
    "trunc": ("Schulte, Stine & Jansen 1999 (truncated with carry estimate): 29-40% less power at 16 and 32 bits; "
              "no 8-bit figure", None),
    "bam": ("Mahdiani et al. 2010: savings reported per break level for other widths; no signed 8-bit figure here",
            None),
    "drum": ("Hashemi et al. 2015: savings reported for 16- and 32-bit DRUM; no 8-bit figure", None),
    "mitchell": ("Mitchell 1962: no power figure (pre-CMOS)", None),
}

_VALUES = np.arange(-128, 128, dtype=np.int64)


def operands() -> tuple[np.ndarray, np.ndarray]:
    """The int8 operand grids ``(a, b)``, each ``[256, 256]`` int64, ``a[i, j] = i - 128``, ``b[i, j] = j - 128``."""
    return np.meshgrid(_VALUES, _VALUES, indexing="ij")


def _exact_table() -> np.ndarray:
    return np.outer(_VALUES, _VALUES)


@dataclass(frozen=True)
class MultiplierStats:
    """Error statistics of a multiplier over all 65,536 operand pairs (uniform), in product units.

    ``mean_error`` and ``error_std`` of ``exact - approx``; ``mean_relative_error``: mean of
    ``|error| / |exact|`` over pairs with a non-zero exact product; ``worst_case_error``: max ``|error|``;
    ``error_probability``: fraction of pairs with a non-zero error.
    """

    name: str
    performance_metric: float
    mean_error: float
    error_std: float
    mean_relative_error: float
    worst_case_error: float
    error_probability: float

    def to_dict(self) -> dict[str, Any]:
        return {k: (v if isinstance(v, str) else float(v)) for k, v in self.__dict__.items()}

    def to_text(self) -> str:
        return (f"{self.name}: energy {self.performance_metric:.3f}, mean error {self.mean_error:.2f}, error std "
                f"{self.error_std:.2f}, mean relative error {self.mean_relative_error:.2%}, worst case "
                f"{self.worst_case_error:.0f}, error probability {self.error_probability:.2%}")

    def __str__(self) -> str:
        return self.to_text()


@dataclass(frozen=True, eq=False)
class ApproximateMultiplier:
    """A signed 8-bit multiplier as seed 002 describes it: ``name``, ``performance_metric``, ``error_map``.

    ``error_map`` is ``[256, 256]`` with ``error_map[a + 128][b + 128] = a * b - approx(a, b)`` for signed
    int8 operands ``a`` (activation) and ``b`` (weight): exact minus approximate. (The reference
    library's own helper returns approximate minus exact; negate its tables.) Values must be
    integers. ``performance_metric`` is what selection minimises (the built-ins: relative energy,
    exact = 1.0). ``factors`` (optional): int64 arrays ``(P, Q)`` of shape ``[K, 256]`` with
    ``approx(a, b) = sum_k P[k, a + 128] * Q[k, b + 128]``, checked exactly on construction; the LUT layers
    use them for fast exact simulation, else a table-gather kernel. ``info``: how the metric was
    derived (gate counts).
    """

    name: str
    performance_metric: float
    error_map: np.ndarray
    factors: tuple[np.ndarray, np.ndarray] | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise MocoError(f"multiplier name must be a non-empty string, got {self.name!r}")
        pm = self.performance_metric
        if isinstance(pm, bool) or not isinstance(pm, (int, float, np.floating)) or not math.isfinite(pm) or pm < 0:
            raise MocoError(f"performance_metric of {self.name!r} must be a finite number >= 0, got {pm!r}")
        table = _check_table(self.error_map, f"error_map of multiplier {self.name!r}")
        object.__setattr__(self, "error_map", table)
        object.__setattr__(self, "performance_metric", float(pm))
        if self.factors is not None:
            p, q = (np.asarray(f) for f in self.factors)
            if p.ndim != 2 or q.ndim != 2 or p.shape != q.shape or p.shape[1] != 256:
                raise MocoError(f"factors of {self.name!r} must be two [K, 256] arrays, got {p.shape} and {q.shape}")
            if not (np.array_equal(p, np.round(p)) and np.array_equal(q, np.round(q))):
                raise MocoError(f"factors of {self.name!r} must be integers")
            p, q = p.astype(np.int64), q.astype(np.int64)
            if not np.array_equal(p.T @ q, self.approx_table):
                raise MocoError(f"factors of {self.name!r} do not reproduce its table exactly")
            object.__setattr__(self, "factors", (p, q))

    # ------------------------------------------------------------------ views
    @property
    def approx_table(self) -> np.ndarray:
        """``[256, 256]`` int64: ``approx(a, b)`` at ``[a + 128, b + 128]``."""
        return _exact_table() - self.error_map

    def __call__(self, a: Any, b: Any) -> np.ndarray:
        """``approx(a, b)`` for int8 arrays (element-wise, broadcast)."""
        a, b = np.asarray(a), np.asarray(b)
        if a.min(initial=0) < -128 or a.max(initial=0) > 127 or b.min(initial=0) < -128 or b.max(initial=0) > 127:
            raise MocoError("operands must be int8 values in [-128, 127]")
        return self.approx_table[a.astype(np.int64) + 128, b.astype(np.int64) + 128]

    @property
    def rank(self) -> int:
        """Number of rank-1 terms the LUT layers run (``0`` means the table-gather kernel)."""
        return 0 if self.factors is None else int(self.factors[0].shape[0])

    def stats(self) -> MultiplierStats:
        """Error statistics over all operand pairs (see :class:`MultiplierStats`)."""
        return error_stats(self)

    def __repr__(self) -> str:
        return f"ApproximateMultiplier({self.name!r}, performance_metric={self.performance_metric:.3f}, rank={self.rank})"

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_function(cls, name: str, fn: Callable[[np.ndarray, np.ndarray], Any], *,
                      performance_metric: float, factors: tuple[np.ndarray, np.ndarray] | None = None
                      ) -> "ApproximateMultiplier":
        """Build from ``fn(a, b) -> approx product``, called once on the full int8 operand grids (numpy
        int64 arrays ``[256, 256]``; a function of scalars is vectorised with ``np.vectorize``)."""
        if not callable(fn):
            raise TypeError(f"fn must be callable (a, b) -> product, got {type(fn).__name__}")
        a, b = operands()
        try:
            out = np.asarray(fn(a, b))
            if out.shape != (256, 256):
                raise ValueError
        except Exception:  # noqa: BLE001 - a scalar-only function: vectorise it
            out = np.asarray(np.vectorize(fn, otypes=[np.float64])(a, b))
        return cls(name, performance_metric, _exact_table() - _check_table(out, f"fn of multiplier {name!r}"),
                   factors=factors, info={"source": "function"})

    @classmethod
    def from_table(cls, name: str, table: Any, *, performance_metric: float, kind: str = "error_map"
                   ) -> "ApproximateMultiplier":
        """Build from a ``[256, 256]`` array or a ``.npy`` file; ``kind="error_map"`` (exact - approx,
        the default) or ``"product"`` (the approximate products themselves)."""
        if kind not in ("error_map", "product"):
            raise MocoError(f"kind must be 'error_map' or 'product', got {kind!r}")
        if isinstance(table, (str, Path)):
            path = Path(table)
            if not path.is_file():
                raise MocoError(f"multiplier table file {path} does not exist")
            try:
                table = np.load(path, allow_pickle=False)
            except ValueError as exc:
                raise MocoError(f"cannot read {path} as a .npy array ({exc})") from None
        arr = _check_table(table, f"table of multiplier {name!r}")
        return cls(name, performance_metric, arr if kind == "error_map" else _exact_table() - arr,
                   info={"source": kind})


def _check_table(table: Any, what: str) -> np.ndarray:
    arr = np.asarray(table)
    if arr.shape != (256, 256):
        raise MocoError(f"{what} must be 256x256 (index [a + 128][b + 128] for int8 a, b), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise MocoError(f"{what} must be numeric, got dtype {arr.dtype}")
    if not np.isfinite(arr).all() or not np.array_equal(arr, np.round(arr)):
        raise MocoError(f"{what} must hold integers (products of int8 operands); found non-integer or NaN values")
    if np.abs(arr).max() > 2**20:
        raise MocoError(f"{what} has values beyond +-2^20; int8 products are at most 2^14 in magnitude")
    return arr.astype(np.int64)


# ---------------------------------------------------------------------------------------- bit designs


def _bits(v: np.ndarray) -> np.ndarray:
    """``[8, len(v)]`` two's-complement bits of int8 values ``v`` (bit 7 is the sign bit)."""
    u = v & 0xFF
    return np.stack([(u >> i) & 1 for i in range(8)])


def _bw_sign(i: int, j: int) -> int:
    """Weight sign of partial product ``a_i b_j`` in a signed (Baugh-Wooley) product: -1 if exactly one is bit 7."""
    return -1 if (i == 7) != (j == 7) else 1


def pp_mask_approx(keep: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Table and exact factors of the signed array multiplier that keeps partial-product bits ``keep[i, j]``.

    ``keep`` is a bool ``[8, 8]`` mask over ``(i, j)`` = (bit of ``a``, bit of ``b``); the product is
    ``sum_{kept} s_ij 2^(i+j) a_i b_j`` with the Baugh-Wooley signs ``s_ij``. The factors group the rows
    ``j`` (or columns ``i``, whichever gives fewer terms) whose kept pattern is the same up to sign.
    Returns ``(approx table [256, 256], (P, Q))``.
    """
    keep = np.asarray(keep, dtype=bool)
    bits = _bits(_VALUES)  # [8, 256]

    def grouped(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # rows r of mask (the "b" side after transposition): term_r(a) = sum_i s 2^i a_i over kept i
        ps: list[np.ndarray] = []
        qs: list[np.ndarray] = []
        for r in range(8):
            p = sum((_bw_sign(i, r) * (1 << i)) * bits[i] for i in range(8) if mask[i, r])
            if isinstance(p, int) or not np.any(p):
                continue
            q = (1 << r) * bits[r]
            for g, pg in enumerate(ps):
                if np.array_equal(pg, p):
                    qs[g] = qs[g] + q
                    break
                if np.array_equal(pg, -p):
                    qs[g] = qs[g] - q
                    break
            else:
                ps.append(p.astype(np.int64))
                qs.append(q.astype(np.int64))
        if not ps:
            return np.zeros((1, 256), np.int64), np.zeros((1, 256), np.int64)
        return np.stack(ps), np.stack(qs)

    p1, q1 = grouped(keep)        # P acts on a, Q on b
    q2, p2 = grouped(keep.T)      # the transposed grouping: P' acts on b, so swap
    p, q = (p1, q1) if len(p1) <= len(p2) else (p2, q2)
    return p.T @ q, (p, q)


def _column_adders(heights: Sequence[int]) -> tuple[int, int]:
    """Full and half adders that reduce columns of ``heights`` bits to one row (ripple, LSB first)."""
    fa = ha = 0
    carry = 0
    for h in list(heights) + [0] * 4:
        n = h + carry
        carry = 0
        while n >= 3:
            fa += 1
            n -= 2
            carry += 1
        if n == 2:
            ha += 1
            carry += 1
    return fa, ha


def array_cost(keep: np.ndarray, *, signed: bool = True) -> dict[str, int]:
    """Cells and transistor count of an array multiplier keeping partial-product bits ``keep[i, j]``.

    One AND per kept bit; the signed (Baugh-Wooley) form adds its two constant ones (columns ``n`` and
    ``2n - 1``); the adders reduce the column heights to one row (:func:`_column_adders`).
    """
    keep = np.asarray(keep, dtype=bool)
    n = keep.shape[0]
    heights = [0] * (2 * n)
    for i in range(n):
        for j in range(n):
            if keep[i, j]:
                heights[i + j] += 1
    if signed and keep.any():
        heights[n] += 1
        heights[2 * n - 1] += 1
    fa, ha = _column_adders(heights)
    ands = int(keep.sum())
    return {"AND": ands, "FA": fa, "HA": ha,
            "transistors": ands * CELL_COST["AND"] + fa * CELL_COST["FA"] + ha * CELL_COST["HA"]}


def _exact_cost() -> int:
    return array_cost(np.ones((8, 8), bool))["transistors"]


def _pp_multiplier(name: str, keep: np.ndarray, info: dict) -> ApproximateMultiplier:
    table, factors = pp_mask_approx(keep)
    cost = array_cost(keep)
    metric = cost["transistors"] / _exact_cost()
    return ApproximateMultiplier(name, metric, _exact_table() - table, factors=factors,
                                 info={**info, "cells": cost, "kept_partial_products": int(np.sum(keep))})


def exact() -> ApproximateMultiplier:
    """The exact signed 8x8 multiplier (Baugh-Wooley array), ``performance_metric = 1.0``."""
    return _pp_multiplier("exact", np.ones((8, 8), bool), {"design": "exact Baugh-Wooley array"})


def truncated(k: int) -> ApproximateMultiplier:
    """Truncated multiplier: drop the partial-product bits of the ``k`` least significant columns (``i + j < k``)."""
    _check_level("k", k, 1, 14)
    keep = np.add.outer(np.arange(8), np.arange(8)) >= k
    return _pp_multiplier(f"trunc{k}", keep, {"design": f"truncated, {k} columns dropped"})


def broken_array(hbl: int, vbl: int) -> ApproximateMultiplier:
    """Broken-array multiplier (Mahdiani et al. 2010): remove rows ``j < hbl`` and columns ``i + j < vbl``."""
    _check_level("hbl", hbl, 0, 7)
    _check_level("vbl", vbl, 0, 14)
    i, j = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    keep = (j >= hbl) & (i + j >= vbl)
    return _pp_multiplier(f"bam_h{hbl}_v{vbl}", keep, {"design": f"broken array, HBL {hbl}, VBL {vbl}"})


def _check_level(name: str, value: int, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise MocoError(f"{name} must be an int in [{lo}, {hi}], got {value!r}")


def _leading_one(m: np.ndarray) -> np.ndarray:
    """Position of the leading one of non-negative ints (0 for 0)."""
    out = np.zeros_like(m)
    for t in range(1, 9):
        out = np.where(m >= (1 << t), t, out)
    return out


def _drum_reduce(v: np.ndarray, k: int) -> np.ndarray:
    """DRUM's operand reduction of signed ``v``: keep ``k`` bits from the leading one, lowest kept bit set."""
    m = np.abs(v)
    t = _leading_one(m)
    shift = np.maximum(t - k + 1, 0)
    reduced = np.where(t >= k, (((m >> shift) | 1) << shift), m)
    return np.sign(v) * reduced


def drum(k: int) -> ApproximateMultiplier:
    """DRUM(k) (Hashemi et al. 2015), sign-magnitude: ``sgn(a) sgn(b) D(|a|) D(|b|)``; one exact factor pair."""
    _check_level("k", k, 2, 7)
    d = _drum_reduce(_VALUES, k).astype(np.int64)
    core = array_cost(np.ones((k, k), bool), signed=False)
    sign_in = 8 * CELL_COST["XOR"] + 8 * CELL_COST["HA"]
    lod = 8 * CELL_COST["AND"] + 8 * CELL_COST["OR"]
    enc = 4 * CELL_COST["OR"]
    steer = k * 7 * CELL_COST["MUX"]
    shift_add = 3 * CELL_COST["FA"]
    barrel = 4 * 16 * CELL_COST["MUX"]
    sign_out = 16 * CELL_COST["XOR"] + 16 * CELL_COST["HA"]
    parts = {"sign_in": 2 * sign_in, "lod": 2 * lod, "encoder": 2 * enc, "steering": 2 * steer,
             "core": core["transistors"], "shift_adder": shift_add, "barrel_shifter": barrel, "sign_out": sign_out}
    metric = sum(parts.values()) / _exact_cost()
    return ApproximateMultiplier(f"drum{k}", metric, _exact_table() - np.outer(d, d), factors=(d[None], d[None]),
                                 info={"design": f"DRUM, k={k}", "transistors": parts})


def mitchell() -> ApproximateMultiplier:
    """Mitchell's logarithmic multiplier (1962), sign-magnitude, exact integer mantissas (rank 63: gather kernel)."""
    a, b = operands()
    x, y = np.abs(a), np.abs(b)
    k1, k2 = _leading_one(x), _leading_one(y)
    m1, m2 = x - (1 << k1), y - (1 << k2)
    cross = m1 * (1 << k2) + m2 * (1 << k1)
    prod = np.maximum((1 << (k1 + k2)) + cross, 2 * cross)
    table = np.where((x == 0) | (y == 0), 0, np.sign(a) * np.sign(b) * prod)
    sign_in = 8 * CELL_COST["XOR"] + 8 * CELL_COST["HA"]
    parts = {"sign_in": 2 * sign_in, "lod": 2 * (8 * CELL_COST["AND"] + 8 * CELL_COST["OR"]),
             "encoder": 2 * 4 * CELL_COST["OR"], "normaliser": 2 * 3 * 7 * CELL_COST["MUX"],
             "mantissa_adder": 7 * CELL_COST["FA"], "exponent_adder": 3 * CELL_COST["FA"],
             "antilog_shifter": 4 * 16 * CELL_COST["MUX"], "sign_out": 16 * CELL_COST["XOR"] + 16 * CELL_COST["HA"]}
    return ApproximateMultiplier("mitchell", sum(parts.values()) / _exact_cost(), _exact_table() - table,
                                 info={"design": "Mitchell logarithmic", "transistors": parts})


def library(*, include_slow: bool = True) -> list[ApproximateMultiplier]:
    """The built-in multipliers: exact, trunc1..trunc9, broken-array (HBL 0..4 x VBL 0, 2, .., 12), DRUM 3..6, Mitchell.

    Broken-array variants that equal another entry's table are dropped. ``include_slow=False`` leaves
    out designs without an exact factorisation (Mitchell), whose LUT layers use the gather kernel.
    """
    out = [exact()] + [truncated(k) for k in range(1, 10)]
    seen = {m.error_map.tobytes() for m in out}
    for h in range(0, 5):
        for v in range(0, 13, 2):
            if h == 0 and v == 0:
                continue
            m = broken_array(h, v)
            if m.error_map.tobytes() not in seen:
                seen.add(m.error_map.tobytes())
                out.append(m)
    out += [drum(k) for k in range(3, 7)]
    if include_slow:
        out.append(mitchell())
    return out


# ---------------------------------------------------------------------------------------- metrics


def error_stats(m: ApproximateMultiplier) -> MultiplierStats:
    """:class:`MultiplierStats` of ``m`` over all 65,536 operand pairs, each pair equally likely."""
    e = m.error_map.astype(np.float64)
    ex = _exact_table().astype(np.float64)
    nz = ex != 0
    return MultiplierStats(m.name, m.performance_metric, float(e.mean()), float(e.std()),
                           float(np.mean(np.abs(e[nz]) / np.abs(ex[nz]))), float(np.abs(e).max()),
                           float(np.mean(e != 0)))


def error_table(multipliers: Iterable[ApproximateMultiplier]):
    """pandas DataFrame, one row per multiplier: metric, rank, error statistics."""
    import pandas as pd

    rows = [{**error_stats(m).to_dict(), "rank": m.rank} for m in multipliers]
    return pd.DataFrame(rows).set_index("name")


def energy_table(multipliers: Iterable[ApproximateMultiplier]):
    """pandas DataFrame: the model's relative energy, its saving, the published figure and the >30% flag.

    ``flag_over_30pct`` is True where a published saving for the same configuration exists and
    differs from the model's saving by more than 30% of the published value; None where none exists.
    """
    import pandas as pd

    rows = []
    for m in multipliers:
        prefix = next((p for p in PUBLISHED if m.name.startswith(p)), None)
        note, pub = PUBLISHED.get(prefix, ("", None)) if prefix else ("", None)
        saving = 1.0 - m.performance_metric
        flag = None if pub is None else bool(abs(saving - pub) > 0.3 * abs(pub))
        rows.append({"name": m.name, "relative_energy": m.performance_metric, "model_saving": saving,
                     "published_saving": pub, "published": note, "flag_over_30pct": flag})
    return pd.DataFrame(rows).set_index("name")


def plot_error_map(m: ApproximateMultiplier | str, path: str | Path | None = None, *, ax=None):
    """Heat map of ``m.error_map`` over (a, b); saved atomically to ``path`` (PNG) when given. Returns the figure.

    ``m``: an :class:`ApproximateMultiplier` or the name of one in :func:`library` (``"trunc4"``)."""
    if isinstance(m, str):
        lib = {x.name: x for x in library()}
        if m not in lib:
            raise MocoError(f"unknown multiplier {m!r}; the library has: {', '.join(lib)}")
        m = lib[m]
    if not isinstance(m, ApproximateMultiplier):
        raise TypeError(f"plot_error_map takes an ApproximateMultiplier or a library name, not {type(m).__name__}")
    import matplotlib

    if path is not None and ax is None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(4.5, 4))
    lim = max(1.0, float(np.abs(m.error_map).max()))
    im = ax.imshow(m.error_map.T, origin="lower", extent=(-128, 127, -128, 127), cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_xlabel("a (activation, int8)")
    ax.set_ylabel("b (weight, int8)")
    ax.set_title(f"{m.name}: a*b - approx(a, b)")
    (fig or ax.figure).colorbar(im, ax=ax)
    fig = fig or ax.figure
    if path is not None:
        from moco.io import atomic_path

        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return fig
