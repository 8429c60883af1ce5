"""Result types of :func:`moco.profile.profile`: one :class:`LayerProfile` per module, a :class:`Profile`.

Units: ``macs`` are multiply-accumulates, every ``*_flops`` column is floating-point operations,
``activation_bytes`` bytes, ``latency_s`` seconds; all counts are for the whole batch of the example
input (see :meth:`Profile.per_sample`). ``flops = 2 * macs + elementwise_flops`` and
``elementwise_flops = bias_flops + activation_flops + other_elementwise_flops``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moco.errors import MocoError
from moco.io import atomic_path

__all__ = [
    "CONVENTIONS", "COUNT_COLUMNS", "LayerProfile", "Profile", "human_bytes", "human_count", "human_seconds",
    "human_share",
]

COUNT_COLUMNS = ("params", "macs", "bias_flops", "activation_flops", "other_elementwise_flops",
                 "elementwise_flops", "flops", "activation_bytes", "calls")
"""Integer columns that :meth:`Profile.total` and :meth:`Profile.per_sample` accept."""

CONVENTIONS = (
    "MACs: multiply-accumulates of conv/linear/matmul/bmm/addmm/baddbmm/mv/dot "
    "(conv: Cin/groups*kH*kW*Cout*Hout*Wout*N), for the whole batch. "
    "FLOPs = 2*MACs + elementwise_flops; elementwise_flops = bias_flops (1 per output element of a conv/addmm "
    "bias) + activation_flops (relu, gelu, sigmoid, tanh, hardtanh, silu, ...: 1 per output element) + "
    "other_elementwise_flops (add/sub/mul/div...: 1 per output element; batch norm with running stats: 2 per "
    "element, with batch stats / layer norm / group norm: 4; max/avg pooling: kernel size per output element, "
    "adaptive pooling: 1 per input element; softmax/log_softmax: 5 per element; sum/mean/max/...: 1 per input "
    "element; var/std/norm: 2). Fused attention / encoder-layer / LSTM kernels count as their unfused paths "
    "(attention dense: all Lq x Lk scores even when causal or masked; LSTM: T*B*4H*(I+H) MACs). Views, copies, concatenation, padding, indexing and allocation cost 0. "
    "activation_bytes: bytes of the module's output tensors, summed over calls. latency_s: median exclusive "
    "seconds per module (children excluded); latency_share: its fraction of the sum over rows."
)
"""The counting conventions in one paragraph (also stored in :meth:`Profile.to_dict`)."""


@dataclass(frozen=True)
class LayerProfile:
    """One module's row: its own work (children excluded), summed over its ``calls`` calls.

    ``name`` is the qualified name as in ``model.named_modules()`` (``""`` for the root), ``type`` the
    class name, ``output_shape`` the shape of one call's output with the batch dimension (a tuple of
    shapes when it returns several tensors; ``None`` if never called), ``params`` the module's own
    parameters (not its children's; a shared parameter counts once, at its first module), ``macs``
    multiply-accumulates, ``bias_flops`` / ``activation_flops`` / ``other_elementwise_flops`` FLOPs,
    ``activation_bytes`` bytes of the output tensors, ``latency_s`` median exclusive seconds per forward
    pass and ``latency_share`` its fraction of the total (both ``None`` when latency was not measured),
    ``unsupported_ops`` the names of ops it ran that have no counting formula.
    """

    name: str
    type: str
    calls: int
    output_shape: tuple | None
    params: int
    macs: int
    bias_flops: int
    activation_flops: int
    other_elementwise_flops: int
    activation_bytes: int
    latency_s: float | None = None
    latency_share: float | None = None
    unsupported_ops: tuple[str, ...] = ()

    @property
    def elementwise_flops(self) -> int:
        """FLOPs of element-wise work: ``bias_flops + activation_flops + other_elementwise_flops``."""
        return self.bias_flops + self.activation_flops + self.other_elementwise_flops

    @property
    def flops(self) -> int:
        """All FLOPs: ``2 * macs + elementwise_flops``."""
        return 2 * self.macs + self.elementwise_flops

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field plus ``elementwise_flops`` and ``flops`` (shapes as lists)."""
        out = asdict(self)
        out["output_shape"] = _jsonable_shape(self.output_shape)
        out["unsupported_ops"] = list(self.unsupported_ops)
        out["elementwise_flops"] = self.elementwise_flops
        out["flops"] = self.flops
        return out


def _jsonable_shape(shape: Any) -> Any:
    if shape is None:
        return None
    if isinstance(shape, (tuple, list)):
        return [_jsonable_shape(s) for s in shape]
    return int(shape)


@dataclass(frozen=True)
class Profile:
    """The profile of one model on one example input (see the module docstring for the conventions).

    ``rows``: one :class:`LayerProfile` per module that was called and is a leaf or did work of its
    own, plus any module owning parameters, in ``named_modules()`` order. ``totals``: a
    :class:`LayerProfile` named ``"total"`` whose counts are the sums over ``rows`` (equal to a
    whole-model count, checked when the profile is built), ``output_shape`` the model's output shape
    and ``latency_s`` the sum of the exclusive times. ``bottleneck``: the row with the most MACs
    (most FLOPs if no row has MACs). ``slowest``: the row with the largest latency (``None`` without
    latency). ``unsupported_ops``: aten op name -> calls for ops with tensor work but no formula.
    ``forward_time_s``: median seconds of a whole forward pass without hooks. ``input_shape``: the
    example input's shape (a tuple of shapes for several inputs); ``batch_size`` its first dimension.
    ``attribution``: ``"per module"``, or the reason rows are not attributed (a TorchScript model: all
    work in the root row, no bottleneck).
    """

    model_type: str
    input_shape: tuple
    batch_size: int
    rows: tuple[LayerProfile, ...]
    totals: LayerProfile
    bottleneck: str | None
    slowest: str | None
    unsupported_ops: dict[str, int] = field(default_factory=dict)
    forward_time_s: float | None = None
    latency_repeats: int = 0
    attribution: str = "per module"

    # ------------------------------------------------------------------ queries

    def layer(self, name: str) -> LayerProfile:
        """The row of module ``name``; ``MocoError`` listing the row names when there is none."""
        for row in self.rows:
            if row.name == name:
                return row
        raise MocoError(f"no profiled module {name!r}; rows are: {', '.join(repr(r.name) for r in self.rows)}")

    def total(self, *columns: str) -> int:
        """Sum over rows of the given count columns, e.g. ``total("macs", "bias_flops")`` (int).

        A column may also be written as an expression ``"macs + bias_flops + activation_flops"``.
        Columns: see :data:`COUNT_COLUMNS`.
        """
        names = [part.strip() for column in columns for part in column.split("+")]
        if not names:
            raise MocoError(f"total() needs at least one column of: {', '.join(COUNT_COLUMNS)}")
        unknown = [n for n in names if n not in COUNT_COLUMNS]
        if unknown:
            raise MocoError(f"unknown column(s) {unknown}; choose from: {', '.join(COUNT_COLUMNS)}")
        return sum(getattr(row, n) for row in self.rows for n in names)

    def seed003_total(self) -> int:
        """Seed 003's FLOP count of the model: ``total("macs", "bias_flops", "activation_flops")``.

        Equal to :func:`moco.profile.seed003_flops` ``["total"]`` for ``fashion_cnn`` at batch size 1.
        """
        return self.total("macs", "bias_flops", "activation_flops")

    def per_sample(self, column: str = "macs", name: str | None = None) -> float:
        """``column`` of module ``name`` (or of the whole model when ``None``) divided by ``batch_size``."""
        value = self.total(column) if name is None else getattr(self.layer(name), self._column(column))
        return value / self.batch_size

    @staticmethod
    def _column(column: str) -> str:
        if column not in COUNT_COLUMNS:
            raise MocoError(f"unknown column {column!r}; choose from: {', '.join(COUNT_COLUMNS)}")
        return column

    # ------------------------------------------------------------------ exports

    def to_dataframe(self, total: bool = False):
        """A pandas DataFrame with one row per module (and a last row named ``"total"`` if ``total``).

        Columns: name, type, calls, output_shape, params, macs, macs_per_sample, bias_flops,
        activation_flops, other_elementwise_flops, elementwise_flops, flops, activation_bytes,
        latency_s, latency_share, unsupported_ops.
        """
        import pandas as pd

        rows = list(self.rows) + ([self.totals] if total else [])
        records = []
        for row in rows:
            record = row.to_dict()
            record["output_shape"] = row.output_shape
            record["unsupported_ops"] = ", ".join(row.unsupported_ops)
            record["macs_per_sample"] = row.macs / self.batch_size
            records.append(record)
        columns = ["name", "type", "calls", "output_shape", "params", "macs", "macs_per_sample", "bias_flops",
                   "activation_flops", "other_elementwise_flops", "elementwise_flops", "flops",
                   "activation_bytes", "latency_s", "latency_share", "unsupported_ops"]
        frame = pd.DataFrame.from_records(records, columns=columns)
        for column in ("latency_s", "latency_share"):
            frame[column] = frame[column].astype(float)
        return frame

    def to_frame(self, total: bool = False):
        """One row per module (:meth:`to_dataframe`), the result protocol's name."""
        return self.to_dataframe(total=total)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict: model, input shape, batch size, rows, totals, bottleneck, slowest, ... ."""
        return {
            "model_type": self.model_type,
            "input_shape": _jsonable_shape(self.input_shape),
            "batch_size": self.batch_size,
            "rows": [row.to_dict() for row in self.rows],
            "totals": self.totals.to_dict(),
            "bottleneck": self.bottleneck,
            "slowest": self.slowest,
            "unsupported_ops": dict(self.unsupported_ops),
            "forward_time_s": self.forward_time_s,
            "latency_repeats": self.latency_repeats,
            "attribution": self.attribution,
            "conventions": CONVENTIONS,
        }

    def to_text(self) -> str:
        """A readable, aligned table with human units (10.6M MACs, 84.5 KiB, 1.23 ms) and a summary."""
        show_calls = any(row.calls != 1 for row in self.rows)
        has_latency = self.totals.latency_s is not None
        header = ["module", "type"] + (["calls"] if show_calls else []) + [
            "output", "params", "MACs", "FLOPs", "act. mem"] + (["latency", "share"] if has_latency else [])
        left = {"module", "type", "output"}

        def cells(row: LayerProfile, name: str) -> list[str]:
            out = [name, row.type] + ([str(row.calls)] if show_calls else [])
            out += [_shape_text(row.output_shape), human_count(row.params), human_count(row.macs),
                    human_count(row.flops), human_bytes(row.activation_bytes)]
            if has_latency:
                out += [human_seconds(row.latency_s), human_share(row.latency_share)]
            return out

        body = [cells(row, row.name or "(root)") for row in self.rows]
        footer = cells(self.totals, "total")
        widths = [max(len(line[i]) for line in [header, footer] + body) for i in range(len(header))]

        def fmt(line: list[str]) -> str:
            return "  ".join(
                text.ljust(width) if column in left else text.rjust(width)
                for text, width, column in zip(line, widths, header)
            ).rstrip()

        rule = "-" * len(fmt(header))
        lines = [f"Profile of {self.model_type} on input {_shape_text(self.input_shape)} (batch {self.batch_size})",
                 fmt(header), rule] + [fmt(line) for line in body] + [rule, fmt(footer), ""]
        total_macs = self.totals.macs
        lines.append(
            f"per sample: {human_count(total_macs / self.batch_size)} MACs, "
            f"{human_count(self.totals.flops / self.batch_size)} FLOPs "
            f"(= 2*MACs + {human_count(self.totals.elementwise_flops / self.batch_size)} element-wise: "
            f"bias {human_count(self.totals.bias_flops / self.batch_size)}, "
            f"activation {human_count(self.totals.activation_flops / self.batch_size)}, "
            f"other {human_count(self.totals.other_elementwise_flops / self.batch_size)})"
        )
        if self.attribution != "per module":
            lines.append(self.attribution)
        if self.bottleneck is not None:
            row = self.layer(self.bottleneck)
            share = row.macs / total_macs if total_macs else 0.0
            lines.append(f"bottleneck (most MACs): {row.name or '(root)'} ({row.type}, "
                         f"{human_count(row.macs)} MACs, {human_share(share)} of all)")
        if self.slowest is not None:
            row = self.layer(self.slowest)
            lines.append(f"slowest (most exclusive time): {row.name or '(root)'} ({row.type}, "
                         f"{human_seconds(row.latency_s)}, {human_share(row.latency_share)})")
        if self.forward_time_s is not None:
            lines.append(f"forward pass: {human_seconds(self.forward_time_s)} "
                         f"(median of {self.latency_repeats}, without hooks)")
        else:
            lines.append("latency: not measured")
        if self.unsupported_ops:
            listed = ", ".join(f"{op} x{n}" for op, n in sorted(self.unsupported_ops.items()))
            lines.append(f"unsupported ops (no formula, not counted): {listed}")
        else:
            lines.append("unsupported ops: none")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()

    def plot(self, path: str | os.PathLike) -> Path:
        """Save a PNG bar chart of MACs per module (top) and latency share (bottom) at ``path``.

        Written atomically (:func:`moco.io.atomic_path`) with matplotlib's Agg renderer; returns the path.
        """
        from matplotlib.figure import Figure

        names = [row.name or "(root)" for row in self.rows]
        positions = list(range(len(names)))
        fig = Figure(figsize=(max(6.0, 0.28 * len(names) + 2.0), 6.5))
        top, bottom = fig.subplots(2, 1, sharex=True)
        top.bar(positions, [row.macs for row in self.rows], color="tab:blue")
        top.set_ylabel("MACs (whole batch)")
        top.set_title(f"{self.model_type} on {_shape_text(self.input_shape)}: "
                      f"{human_count(self.totals.macs)} MACs, {human_count(self.totals.flops)} FLOPs")
        if self.totals.latency_s is not None:
            bottom.bar(positions, [100.0 * (row.latency_share or 0.0) for row in self.rows], color="tab:orange")
            bottom.set_ylabel("latency share (%)")
        else:
            bottom.text(0.5, 0.5, "latency not measured", ha="center", va="center", transform=bottom.transAxes)
            bottom.set_yticks([])
        bottom.set_xticks(positions)
        bottom.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        bottom.set_xlabel("module")
        fig.tight_layout()
        path = Path(path)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        return path


# ---------------------------------------------------------------------- human units


def human_count(value: float) -> str:
    """``10616832 -> "10.6M"``: three significant digits with K, M, G, T (powers of 1000)."""
    value = float(value)
    if abs(value) < 1000:
        return f"{value:.0f}" if value == int(value) else f"{value:.3g}"
    for unit in ("K", "M", "G", "T", "P"):
        value /= 1000.0
        text = f"{value:.3g}"
        if abs(float(text)) < 1000:
            return text + unit
    return text + "P"


def human_bytes(value: float) -> str:
    """``36864 -> "36 KiB"``: three significant digits with KiB, MiB, GiB (powers of 1024)."""
    value = float(value)
    if abs(value) < 1024:
        return f"{value:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024.0
        text = f"{value:.3g}"
        if abs(float(text)) < 1024:
            return f"{text} {unit}"
    return f"{text} TiB"


def human_seconds(value: float | None) -> str:
    """Seconds as ``"1.23 ms"``, ``"45.6 us"`` or ``"2.01 s"``; ``"-"`` for ``None``."""
    if value is None:
        return "-"
    if value >= 1.0:
        return f"{value:.3g} s"
    if value >= 1e-3:
        return f"{value * 1e3:.3g} ms"
    return f"{value * 1e6:.3g} us"


def human_share(value: float | None) -> str:
    """A fraction as a percentage ``"12.3%"``; ``"-"`` for ``None``."""
    return "-" if value is None else f"{100.0 * value:.1f}%"


def _shape_text(shape: Any) -> str:
    if shape is None:
        return "-"
    if shape and isinstance(shape[0], (tuple, list)):
        return "(" + ", ".join(_shape_text(s) for s in shape) + ")"
    return "x".join(str(int(s)) for s in shape) if shape else "scalar"
