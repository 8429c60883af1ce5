"""LUT-simulated layers: Conv2d and Linear whose every product is ``approx(a, b)`` of an approximate multiplier.

:class:`LUTConv2d` / :class:`LUTLinear` are quantised layers (:mod:`moco.approx.quant`) whose forward
value is ``dequantise(sum over the fan-in of approx(a_i, w_i))``, accumulated exactly (int32
semantics), plus the float bias; the backward pass uses the exact products of the fake-quant layer
(straight-through), as in approximate retraining.

Two kernels, both bit-exact (tested against a brute-force table lookup of every product):

* **factor kernel** (every built-in except Mitchell): the multiplier's exact integer factorisation
  ``approx(a, b) = sum_k P_k(a) Q_k(b)`` (:attr:`ApproximateMultiplier.factors`) turns the layer into
  ONE exact convolution / matmul with ``K`` times the input channels: the inputs ``P_k(x_q)``
  (256-entry lookups) stacked per group along the channel axis, the weights ``Q_k(w_q)`` likewise.
  Integer values in float32 are exact while ``fan_in * sum_k max|P_k| max|Q_k| < 2^24``; beyond it
  the convolution runs in float64 (exact to ``2^53``).
* **gather kernel** (any table): im2col of the codes, then ``torch.nn.functional.embedding_bag``
  with ``mode="sum"`` over a per-layer table ``T[f * 256 + a, o] = approx(a, w[o, f])``: one C++ gather-
  sum per output element and fan-in position, no Python loop over elements (chunked over output
  channels to bound memory). Much slower than the factor kernel; used for tables without factors.

Zero padding is applied to the int8 codes before the lookups, so padded positions contribute
``approx(0, w)`` exactly as a hardware multiplier fed a zero would (0 for every built-in).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moco.approx.multipliers import ApproximateMultiplier
from moco.approx.quant import QuantConv2d, QuantLayer, QuantLinear, rebuild_as
from moco.errors import MocoError

__all__ = ["LUTConv2d", "LUTLinear", "to_lut", "reference_accumulate", "kernel_name"]

_F32_EXACT = 2**24
_GATHER_TABLE_FLOATS = 8_000_000  # chunk the gather table over output channels above this size


def kernel_name(layer: QuantLayer) -> str:
    """``"factor"`` or ``"gather"``: which kernel ``layer``'s multiplier runs on."""
    return "factor" if layer.multiplier.factors is not None else "gather"


def _factor_tables(m: ApproximateMultiplier, device) -> tuple[torch.Tensor, torch.Tensor, float]:
    p, q = m.factors
    bound = float(np.sum(np.abs(p).max(1) * np.abs(q).max(1)))
    return torch.as_tensor(p, dtype=torch.float64, device=device), torch.as_tensor(q, dtype=torch.float64, device=device), bound


class _LUTMixin:
    """Shared kernel state: the multiplier and its tensors, cached per multiplier object."""

    multiplier: ApproximateMultiplier

    def _tables(self, device):
        cache = getattr(self, "_lut_cache", None)
        if cache is None or cache[0] is not self.multiplier:
            m = self.multiplier
            entry = {"approx": torch.as_tensor(m.approx_table, dtype=torch.float64, device=device)}
            if m.factors is not None:
                entry["P"], entry["Q"], entry["bound"] = _factor_tables(m, device)
            cache = (m, entry)
            self._lut_cache = cache
        return cache[1]

    def _dtype(self, bound: float) -> torch.dtype:
        return torch.float32 if self.fan_in * bound < _F32_EXACT else torch.float64

    def _gather_dtype(self) -> torch.dtype:
        peak = float(np.abs(self.multiplier.approx_table).max())
        return torch.float32 if self.fan_in * peak < _F32_EXACT else torch.float64


def _pad_amounts(layer: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding of ``layer`` as ``F.pad`` takes it."""
    if isinstance(layer.padding, str):
        if layer.padding == "valid":
            return (0, 0, 0, 0)
        kh, kw = layer.kernel_size
        th, tw = layer.dilation[0] * (kh - 1), layer.dilation[1] * (kw - 1)
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    ph, pw = layer.padding
    return (pw, pw, ph, ph)


class LUTConv2d(_LUTMixin, QuantConv2d):
    """Quantised Conv2d whose products come from ``multiplier`` (see :mod:`moco.approx.lut`)."""

    def _codes_padded(self, x_q: torch.Tensor) -> torch.Tensor:
        pad = _pad_amounts(self)
        return F.pad(x_q, pad) if any(pad) else x_q

    def _approx_acc(self, x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
        tables = self._tables(x_q.device)
        xp = self._codes_padded(x_q)
        xi = (xp + 128).long()
        wi = (w_q + 128).long()
        if "P" in tables:
            dtype = self._dtype(tables["bound"])
            p, q = tables["P"].to(dtype), tables["Q"].to(dtype)
            k = p.shape[0]
            n, c, h, w = xi.shape
            g = self.groups
            xs = p[:, xi].reshape(k, n, g, c // g, h, w).permute(1, 2, 0, 3, 4, 5).reshape(n, k * c, h, w)
            o = wi.shape[0]
            ws = q[:, wi].permute(1, 0, 2, 3, 4).reshape(o, k * wi.shape[1], *wi.shape[2:])
            acc = F.conv2d(xs, ws, None, self.stride, 0, self.dilation, g)
            return acc.to(torch.float32)
        return self._gather_conv(xi, wi, tables["approx"])

    def _gather_conv(self, xi: torch.Tensor, wi: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
        n = xi.shape[0]
        g = self.groups
        cg = xi.shape[1] // g
        og = wi.shape[0] // g
        dtype = self._gather_dtype()
        outs = []
        for gi in range(g):
            cols = F.unfold(xi[:, gi * cg:(gi + 1) * cg].to(torch.float32), self.kernel_size, self.dilation, 0,
                            self.stride).long()  # [N, F, L]
            hout = (xi.shape[2] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
            wout = (xi.shape[3] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
            fan = cols.shape[1]
            idx = (cols.transpose(1, 2) + 256 * torch.arange(fan)).reshape(-1, fan)  # [N * L, F]
            wg = wi[gi * og:(gi + 1) * og].reshape(og, fan)  # [O, F]
            outs.append(_embedding_sum(idx, wg, approx, dtype).reshape(n, hout * wout, og).transpose(1, 2)
                        .reshape(n, og, hout, wout))
        return torch.cat(outs, 1).to(torch.float32)


def _embedding_sum(idx: torch.Tensor, wi: torch.Tensor, approx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``out[r, o] = sum_f approx[a_(r,f), w_(o,f)]`` given ``idx[r, f] = f * 256 + a`` and weight codes ``wi``."""
    o, fan = wi.shape
    chunk = max(1, _GATHER_TABLE_FLOATS // (fan * 256))
    outs = []
    for start in range(0, o, chunk):
        wc = wi[start:start + chunk]  # [o', F]
        table = approx[:, wc].permute(2, 0, 1).reshape(fan * 256, len(wc)).to(dtype)  # [F * 256, o']
        outs.append(F.embedding_bag(idx, table, mode="sum"))
    return torch.cat(outs, 1)


class LUTLinear(_LUTMixin, QuantLinear):
    """Quantised Linear whose products come from ``multiplier`` (see :mod:`moco.approx.lut`)."""

    def _approx_acc(self, x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
        tables = self._tables(x_q.device)
        lead = x_q.shape[:-1]
        xi = (x_q.reshape(-1, x_q.shape[-1]) + 128).long()
        wi = (w_q + 128).long()
        if "P" in tables:
            dtype = self._dtype(tables["bound"])
            p, q = tables["P"].to(dtype), tables["Q"].to(dtype)
            k = p.shape[0]
            xs = p[:, xi].permute(1, 0, 2).reshape(len(xi), -1)
            ws = q[:, wi].permute(1, 0, 2).reshape(wi.shape[0], -1)
            acc = xs @ ws.T
        else:
            fan = xi.shape[1]
            acc = _embedding_sum(xi + 256 * torch.arange(fan), wi, tables["approx"], self._gather_dtype())
        return acc.to(torch.float32).reshape(*lead, -1)


def to_lut(layer: QuantLayer, multiplier: ApproximateMultiplier) -> QuantLayer:
    """A LUT layer sharing ``layer``'s parameters and quantisation state, with ``multiplier``'s products."""
    if not isinstance(multiplier, ApproximateMultiplier):
        raise TypeError(f"multiplier must be an ApproximateMultiplier, got {type(multiplier).__name__}")
    if isinstance(layer, QuantConv2d):
        new = rebuild_as(layer, LUTConv2d)
    elif isinstance(layer, QuantLinear):
        new = rebuild_as(layer, LUTLinear)
    else:
        raise MocoError(f"{type(layer).__name__} is not supported: LUT layers replace QuantConv2d and QuantLinear "
                        "(quantise the model with moco.approx.quantize first)")
    new.multiplier = multiplier
    new._lut_cache = None
    return new


@torch.no_grad()
def reference_accumulate(layer: QuantLayer, x_q: torch.Tensor, w_q: torch.Tensor, table: Any) -> np.ndarray:
    """Brute-force int64 accumulation: every product looked up in ``table`` (``[256, 256]`` approx products).

    Numpy, one lookup per (sample, output, fan-in position), for checking the kernels on small inputs.
    """
    t = np.asarray(table, dtype=np.int64)
    if isinstance(layer, nn.Conv2d):
        pad = _pad_amounts(layer)
        xp = F.pad(x_q.to(torch.float64), pad)
        g = layer.groups
        cg, og = xp.shape[1] // g, w_q.shape[0] // g
        hout = (xp.shape[2] - layer.dilation[0] * (layer.kernel_size[0] - 1) - 1) // layer.stride[0] + 1
        wout = (xp.shape[3] - layer.dilation[1] * (layer.kernel_size[1] - 1) - 1) // layer.stride[1] + 1
        outs = []
        for gi in range(g):
            cols = F.unfold(xp[:, gi * cg:(gi + 1) * cg], layer.kernel_size, layer.dilation, 0, layer.stride)
            a = cols.numpy().astype(np.int64) + 128                       # [N, F, L]
            b = w_q[gi * og:(gi + 1) * og].reshape(og, -1).numpy().astype(np.int64) + 128  # [O, F]
            prods = t[a[:, None, :, :], b[None, :, :, None]]             # [N, O, F, L]
            outs.append(prods.sum(2).reshape(len(a), og, hout, wout))
        return np.concatenate(outs, 1)
    a = x_q.reshape(-1, x_q.shape[-1]).numpy().astype(np.int64) + 128
    b = w_q.numpy().astype(np.int64) + 128
    return t[a[:, None, :], b[None, :, :]].sum(2).reshape(*x_q.shape[:-1], -1)
