"""Per-layer multiplier selection and deployment (seed 002's ``select_multipliers`` / ``deploy_multipliers``).

:func:`select_multipliers` picks, for every quantised layer, the cheapest multiplier (lowest
``performance_metric``) whose error, propagated to the layer's output, fits inside the noise the
layer tolerates:

* the operand distributions: ``p_a``, the histogram of the layer's int8 input codes over ``data``
  (a sample of it), and ``p_w``, the histogram of its int8 weight codes;
* the error of one product under them: mean ``mu = p_a^T E p_w`` and variance
  ``var = p_a^T E^2 p_w - mu^2`` of the error map ``E`` (exact - approx);
* aggregated over the fan-in of ``n`` products per output (treated as independent) and dequantised:
  ``error std = sqrt(n * var) * s_x * s_w`` (``s_w``: root-mean-square over channels when per-channel);
* tolerated: ``sigma_l * std(y_l)``, with ``std(y_l)`` the std of the layer's float output on the
  same sample (the same quantity the noise search scaled its noise by).

The mean error ``n * mu`` is a per-layer offset that the following BatchNorm and the approximate
retraining absorb; selection, like the noise search, bounds the spread only. With ``sigma_l = 0``
only error-free multipliers fit (the exact one); larger ``sigma_l`` admit cheaper ones. When no
candidate fits (e.g. no exact multiplier offered) the one with the smallest error is taken and the
layer is marked ``fits=False``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from moco.approx.agn import layer_macs, sigmas
from moco.approx.lut import to_lut
from moco.approx.multipliers import ApproximateMultiplier
from moco.approx.quant import limited_batches, quant_layers, replace_layers, run_batches
from moco.errors import MocoError

__all__ = ["LayerSelection", "SelectionResult", "select_multipliers", "deploy_multipliers", "uniform_assignment",
           "operand_statistics", "propagated_error_std"]


@dataclass(frozen=True)
class LayerSelection:
    """One layer's choice: ``multiplier`` (name), its ``performance_metric`` and ``relative_energy``
    (metric / the exact multiplier's), ``opcount`` (MACs per sample), ``relative_opcount`` (share of the
    quantised layers' MACs), ``sigma`` (tolerated noise), ``output_std``, ``tolerance`` (``sigma * output_std``),
    ``error_std`` (the chosen multiplier's propagated error std), ``fits``."""

    name: str
    multiplier: str
    performance_metric: float
    relative_energy: float
    opcount: float
    relative_opcount: float
    sigma: float
    output_std: float
    tolerance: float
    error_std: float
    fits: bool

    def relative_energy_consumption(self, metric_max: float) -> float:
        """Seed 002's name: ``performance_metric / metric_max``."""
        return self.performance_metric / metric_max

    def relative_opcount_of(self, opcount: float) -> float:
        return self.opcount / opcount


@dataclass(frozen=True)
class SelectionResult:
    """Per-layer selections and the op-weighted ``relative_energy_consumption`` (exact multiplier = 1).

    ``metric_max``: the reference metric (the exact multiplier's if offered, else the largest);
    ``opcount``: MACs per sample of all quantised layers; ``candidates``: names offered.
    """

    layers: tuple[LayerSelection, ...]
    metric_max: float
    opcount: float
    candidates: tuple[str, ...]

    @property
    def relative_energy_consumption(self) -> float:
        return float(sum(l.relative_opcount * l.relative_energy for l in self.layers))

    @property
    def assignment(self) -> dict[str, str]:
        """``{layer: multiplier name}``."""
        return {l.name: l.multiplier for l in self.layers}

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [dict(l.__dict__) for l in self.layers], "metric_max": self.metric_max,
                "opcount": self.opcount, "candidates": list(self.candidates),
                "relative_energy_consumption": self.relative_energy_consumption}

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([l.__dict__ for l in self.layers]).set_index("name")

    def to_text(self) -> str:
        wl = max([len("layer"), *(len(l.name) for l in self.layers)])  # long qualified names keep the columns
        wm = max([len("multiplier"), *(len(l.multiplier) for l in self.layers)])
        head = f"{'layer':<{wl}} {'multiplier':<{wm}} {'rel.energy':>10} {'rel.ops':>8} {'sigma':>7} {'err/tol':>8}"
        lines = [head]
        for l in self.layers:
            ratio = l.error_std / l.tolerance if l.tolerance > 0 else (0.0 if l.error_std == 0 else math.inf)
            lines.append(f"{l.name:<{wl}} {l.multiplier:<{wm}} {l.relative_energy:>10.3f} {l.relative_opcount:>8.1%} "
                         f"{l.sigma:>7.3f} {ratio:>8.2f}{'' if l.fits else '  (none fits)'}")
        lines.append(f"relative energy consumption (op-weighted): {self.relative_energy_consumption:.3f}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()

    def plot(self, path: str | Path | None = None):
        """Seed 002's two bar charts: relative energy per layer (line: the op-weighted total) and relative
        op count per layer. Saved atomically to ``path`` (PNG) when given; returns the figure."""
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        x = np.arange(len(self.layers))
        labels = [l.name for l in self.layers]
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(4.5, 6))
        top.bar(x, [l.relative_energy for l in self.layers])
        top.axhline(self.relative_energy_consumption, color="black")
        top.set_xticks(x, labels, rotation=45)
        top.set_ylabel("Relative Energy Consumption")
        for xi, l in zip(x, self.layers):
            top.annotate(l.multiplier, (xi, l.relative_energy), ha="center", va="bottom", fontsize=7)
        bottom.bar(x, [l.relative_opcount for l in self.layers], color="orange")
        bottom.set_xticks(x, labels, rotation=45)
        bottom.set_ylabel("Relative Opcount")
        fig.tight_layout()
        if path is not None:
            from moco.io import atomic_path

            with atomic_path(path) as tmp:
                fig.savefig(tmp, format="png", dpi=100)
        return fig


@dataclass(frozen=True)
class _OperandStats:
    p_a: np.ndarray          # [256] histogram of input codes (sums to 1)
    p_w: np.ndarray          # [256] histogram of weight codes
    fan_in: int
    x_scale: float
    w_scale_rms: float
    output_std: float


@torch.no_grad()
def operand_statistics(model: nn.Module, data: Any, *, max_samples: int = 512, batch_size: int = 256
                       ) -> dict[str, _OperandStats]:
    """Per quantised layer: input-code and weight-code histograms, fan-in, scales and output std on ``data``."""
    layers = quant_layers(model)
    if not layers:
        raise MocoError("the model has no quantised layers; quantise it first (moco.approx.quantize)")
    if data is None:
        raise MocoError("select_multipliers needs data (a few hundred inputs) to sample operand distributions")
    hist = {n: torch.zeros(256, dtype=torch.float64) for n, _ in layers}
    moments = {n: [0.0, 0.0, 0] for n, _ in layers}

    def hook(name):
        def fn(mod, inp, out):
            codes = torch.clamp(torch.round(inp[0] / mod.activation_scale()), -128, 127).long() + 128
            hist[name] += torch.bincount(codes.flatten(), minlength=256).double()
            o = out.double()
            m = moments[name]
            m[0] += float(o.sum())
            m[1] += float((o * o).sum())
            m[2] += o.numel()
        return fn

    was = model.training
    model.eval()
    handles = [layer.register_forward_hook(hook(n)) for n, layer in layers]
    try:
        seen = run_batches(model, data, batch_size, max_samples)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    if seen == 0:
        raise MocoError("select_multipliers got empty data; pass a few hundred inputs")
    out = {}
    for name, layer in layers:
        s_w = layer.weight_scale()
        codes = torch.clamp(torch.round(layer.weight.detach() / layer._wshape(s_w)), -128, 127).long() + 128
        p_w = torch.bincount(codes.flatten(), minlength=256).double()
        s, s2, cnt = moments[name]
        var = max(s2 / cnt - (s / cnt) ** 2, 0.0)
        out[name] = _OperandStats((hist[name] / hist[name].sum()).numpy(), (p_w / p_w.sum()).numpy(), layer.fan_in,
                                  float(layer.activation_scale()), float(torch.sqrt((s_w**2).mean())), math.sqrt(var))
    return out


def propagated_error_std(m: ApproximateMultiplier, stats: _OperandStats) -> float:
    """Std of the layer-output error (float units) of multiplier ``m`` under the layer's operand statistics."""
    e = m.error_map.astype(np.float64)
    mu = stats.p_a @ e @ stats.p_w
    var = max(stats.p_a @ (e * e) @ stats.p_w - mu * mu, 0.0)
    return math.sqrt(stats.fan_in * var) * stats.x_scale * stats.w_scale_rms


def select_multipliers(
    model: nn.Module,
    data: Any,
    multipliers: Sequence[ApproximateMultiplier],
    *,
    sigma: Mapping[str, float] | None = None,
    max_samples: int = 512,
) -> SelectionResult:
    """Match each quantised layer of ``model`` to the cheapest multiplier its noise tolerance admits.

    ``sigma``: tolerated relative noise per layer name (default: the learned ``sigma_l`` on the model,
    from :func:`moco.approx.agn.train_gradient`). ``data``: inputs whose first ``max_samples`` give the
    operand distributions and output std. ``multipliers``: the candidates. See the module docstring.
    """
    cands = list(multipliers)
    if not cands or not all(isinstance(m, ApproximateMultiplier) for m in cands):
        raise MocoError("multipliers must be a non-empty list of ApproximateMultiplier (e.g. moco.approx.library())")
    names = [m.name for m in cands]
    if len(set(names)) != len(names):
        raise MocoError(f"multiplier names must be unique, got {names}")
    sig = dict(sigmas(model) if sigma is None else sigma)
    layer_names = [n for n, _ in quant_layers(model)]
    missing = [n for n in layer_names if n not in sig]
    if missing:
        raise MocoError(f"no sigma for layers {missing}: run train_gradient first or pass sigma={{layer: value}}")
    for n, v in sig.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise MocoError(f"sigma of layer {n!r} is {v!r}; it must be a finite number (did the noise search diverge?)")
    stats = operand_statistics(model, data, max_samples=max_samples)
    first = next(iter(limited_batches(data, 1, 1)))[0]
    macs = layer_macs(model, first)
    total_macs = float(sum(macs.values()))
    if total_macs <= 0:
        raise MocoError("the quantised layers do no multiply-accumulates on this input")
    fractions = {n: v / total_macs for n, v in macs.items()}
    exact_metric = next((m.performance_metric for m in cands if not np.any(m.error_map)), None)
    metric_max = exact_metric if exact_metric else max(m.performance_metric for m in cands)
    if metric_max <= 0:
        raise MocoError("the reference performance_metric is 0; give the exact multiplier a positive metric")
    rows = []
    for name in layer_names:
        st = stats[name]
        s = abs(float(sig[name]))
        tol = s * st.output_std
        errs = [propagated_error_std(m, st) for m in cands]
        fitting = [i for i, e in enumerate(errs) if e <= tol]
        if fitting:
            best = min(fitting, key=lambda i: (cands[i].performance_metric, errs[i]))
        else:
            best = min(range(len(cands)), key=lambda i: (errs[i], cands[i].performance_metric))
        m = cands[best]
        rows.append(LayerSelection(name, m.name, m.performance_metric, m.performance_metric / metric_max,
                                   fractions[name] * total_macs, fractions[name], s, st.output_std, tol, errs[best],
                                   bool(fitting)))
    return SelectionResult(tuple(rows), float(metric_max), float(total_macs), tuple(names))


def uniform_assignment(model: nn.Module, multiplier: ApproximateMultiplier) -> dict[str, ApproximateMultiplier]:
    """``{layer: multiplier}`` for every quantised layer: one multiplier everywhere."""
    return {n: multiplier for n, _ in quant_layers(model)}


def deploy_multipliers(
    model: nn.Module,
    selection: SelectionResult | Mapping[str, ApproximateMultiplier],
    multipliers: Sequence[ApproximateMultiplier] | None = None,
) -> nn.Module:
    """A copy of ``model`` whose quantised layers are LUT layers running the selected multipliers.

    ``selection``: a :class:`SelectionResult` (its names are looked up in ``multipliers``) or a mapping
    ``{layer: ApproximateMultiplier}``. The model itself is not modified; the sigmas are dropped.
    """
    if isinstance(selection, SelectionResult):
        if multipliers is None:
            raise MocoError("deploy_multipliers(model, selection) needs multipliers= (the list selection chose from)")
        by_name = {m.name: m for m in multipliers}
        unknown = [n for n in selection.assignment.values() if n not in by_name]
        if unknown:
            raise MocoError(f"multipliers {sorted(set(unknown))} chosen by the selection are not in multipliers=")
        mapping = {layer: by_name[m] for layer, m in selection.assignment.items()}
    else:
        mapping = dict(selection)
    layers = dict(quant_layers(model))
    unknown = [n for n in mapping if n not in layers]
    if unknown:
        raise MocoError(f"layers {unknown} are not quantised layers of the model; choose from {sorted(layers)}")
    out = copy.deepcopy(model)
    for _, layer in quant_layers(out):
        layer.sigma = None
    replace_layers(out, list(mapping), lambda n, m: to_lut(m, mapping[n]))
    return out
