"""8-bit quantisation-aware training (QAT) for Conv2d and Linear, with each layer's integer view.

:func:`quantize` returns a copy of a model whose ``Conv2d`` and ``Linear`` layers are
:class:`QuantConv2d` / :class:`QuantLinear`: fake quantisation of the input activation and the weight
with straight-through gradients (the rounding is treated as identity in the backward pass).

* **Symmetric signed int8** for both operands (zero point 0, codes ``-128 .. 127``): the approximate
  multipliers of :mod:`moco.approx.multipliers` act on signed int8 pairs, so an asymmetric zero
  point (which turns each product into ``(q - z) w``, a 9-bit operand) is not used. Zero points are
  still reported (always 0) in :class:`IntegerView`.
* Activations per tensor: ``scale = max|x| / 127`` from an observer calibrated on data
  (``observer="frozen"``: the running max over the calibration batches, then fixed;
  ``observer="ema"``: calibrated the same way, then updated in training mode as an exponential moving
  average of each batch's max with ``momentum``).
* Weights per tensor or per output channel (``per_channel=True``): ``scale = max|w| / 127``,
  recomputed from the current weights at every forward.
* The bias stays in float and is added after dequantisation (an int32 bias at scale
  ``s_x * s_w`` would round it; the difference is below float tolerance and irrelevant to the
  multipliers, which only see the products).

Integer view: :meth:`QuantConv2d.integer_view` returns the int8 operands, scales and zero points;
:meth:`QuantConv2d.integer_forward` computes the exact int32 accumulation of exact int8 products and
dequantises it (``acc * s_x * s_w + bias``), which equals the fake-quant forward to float tolerance.
Integer accumulation is carried out in float64 convolutions of integer values, exact while
``fan_in * 2^14 < 2^53`` (always, in practice), then cast to int32 (torch has no int8 convolution on CPU).

The layers also hold the additive-Gaussian-noise parameter ``sigma`` of :mod:`moco.approx.agn`
(None until enabled) and the multiplier of :mod:`moco.approx.lut` (None here: exact products).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from moco.batches import iter_batches, num_samples
from moco.errors import MocoError, input_error

__all__ = [
    "QuantConv2d",
    "QuantLinear",
    "QuantLayer",
    "IntegerView",
    "quantize",
    "calibrate",
    "quant_layers",
    "fake_quantize",
    "QMIN",
    "QMAX",
    "rebuild_as",
    "replace_layers",
    "limited_batches",
    "run_batches",
    "export_qdq",
    "QDQExport",
]

QMIN, QMAX = -128, 127
_SUPPORTED = (nn.Conv2d, nn.Linear)


def _round_clamp(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(v), QMIN, QMAX)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, fake-quantised x)``: int8 codes as a float tensor and ``codes * scale`` with a
    straight-through gradient (identity) to ``x``."""
    codes = _round_clamp(x.detach() / scale)
    return codes, x + (codes * scale - x).detach()


@dataclass(frozen=True)
class IntegerView:
    """A quantised layer's integer operands for one input.

    ``x_q`` int8 activation codes (the input as the layer sees it), ``w_q`` int8 weight codes,
    ``x_scale`` (float, per tensor), ``w_scale`` (float tensor ``[out]`` per channel or ``[1]``),
    zero points (0: symmetric), ``bias`` (float or None). Real value = ``scale * (code - zero_point)``.
    """

    x_q: torch.Tensor
    w_q: torch.Tensor
    x_scale: float
    w_scale: torch.Tensor
    x_zero_point: int
    w_zero_point: int
    bias: torch.Tensor | None


class QuantLayer:
    """Mixin with the quantisation state shared by :class:`QuantConv2d` and :class:`QuantLinear`.

    Buffers: ``act_max`` (the observer's max |x|; 0 until calibrated). Attributes: ``per_channel``,
    ``observer`` (``"frozen"`` or ``"ema"``), ``momentum``, ``calibrating`` (True while
    :func:`calibrate` runs), ``sigma`` (AGN parameter or None), ``multiplier`` (None: exact).
    """

    act_max: torch.Tensor
    weight: nn.Parameter
    bias: nn.Parameter | None

    def _setup_quant(self, per_channel: bool, observer: str, momentum: float) -> None:
        if observer not in ("frozen", "ema"):
            raise MocoError(f"observer must be 'frozen' or 'ema', got {observer!r}")
        if not 0 < momentum <= 1:
            raise MocoError(f"momentum must be in (0, 1], got {momentum!r}")
        self.register_buffer("act_max", torch.zeros(()))
        self.per_channel = bool(per_channel)
        self.observer = observer
        self.momentum = float(momentum)
        self.calibrating = False
        self.sigma: nn.Parameter | None = None
        self.multiplier = None
        self.layer_name = ""
        self.export_qdq = False

    # -------------------------------------------------------------- scales
    def _observe(self, x: torch.Tensor) -> None:
        m = x.detach().abs().max()
        if self.calibrating:
            self.act_max.copy_(torch.maximum(self.act_max, m))
        elif self.training and self.observer == "ema" and self.act_max > 0:
            self.act_max.mul_(1 - self.momentum).add_(self.momentum * m)

    def activation_scale(self) -> torch.Tensor:
        """Per-tensor activation scale ``max|x| / 127`` (raises MocoError before calibration)."""
        if not float(self.act_max) > 0:
            raise MocoError(f"quantised layer {self.layer_name or type(self).__name__} has no activation range: "
                            "calibrate it on data first (moco.approx.quantize(model, calibration_data) or calibrate())")
        return self.act_max / QMAX

    def weight_scale(self) -> torch.Tensor:
        """Weight scale ``max|w| / 127``: shape ``[out]`` per channel, else ``[1]`` (1.0 where w is all 0)."""
        w = self.weight.detach()
        m = w.abs().flatten(1).amax(1) if self.per_channel else w.abs().max().reshape(1)
        return torch.where(m > 0, m / QMAX, torch.ones_like(m))

    def _wshape(self, s: torch.Tensor) -> torch.Tensor:
        return s.reshape(-1, *([1] * (self.weight.dim() - 1)))

    def _oshape(self, s: torch.Tensor, ndim: int) -> torch.Tensor:
        """``s`` ([out] or [1]) shaped to broadcast over the output's channel dim."""
        if isinstance(self, nn.Conv2d):
            return s.reshape(1, -1, 1, 1)
        return s.reshape(*([1] * (ndim - 1)), -1)

    # -------------------------------------------------------------- forward
    def _op(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError  # implemented by QuantConv2d / QuantLinear

    def _approx_acc(self, x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
        """Integer accumulation of ``multiplier`` products (lut layers); not reached without a multiplier."""
        raise MocoError(f"{type(self).__name__} has no approximate multiplier; deploy one with moco.approx.lut")

    def _qdq_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same fake quantisation through torch's fake-quant ops, which ONNX exports as QuantizeLinear /
        DequantizeLinear pairs (ONNX Runtime runs such QDQ graphs with int8 kernels)."""
        s_x = float(self.activation_scale())
        s_w = self.weight_scale()
        xf = torch.fake_quantize_per_tensor_affine(x, s_x, 0, QMIN, QMAX)
        if self.per_channel:
            wf = torch.fake_quantize_per_channel_affine(self.weight, s_w, torch.zeros(len(s_w), dtype=torch.int32), 0,
                                                        QMIN, QMAX)
        else:
            wf = torch.fake_quantize_per_tensor_affine(self.weight, float(s_w), 0, QMIN, QMAX)
        return self._op(xf, wf, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.export_qdq:
            return self._qdq_forward(x)
        if self.calibrating:
            self._observe(x)
            return self._op(x, self.weight, self.bias)
        self._observe(x)
        s_x = self.activation_scale()
        s_w = self.weight_scale()
        x_q, x_fq = fake_quantize(x, s_x)
        w_q, w_fq = fake_quantize(self.weight, self._wshape(s_w))
        y = self._op(x_fq, w_fq, self.bias)
        if self.multiplier is not None:
            acc = self._approx_acc(x_q, w_q)
            y_approx = acc * (s_x * self._oshape(s_w, acc.dim()))
            if self.bias is not None:
                y_approx = y_approx + self._oshape(self.bias.detach(), acc.dim())
            # forward value: exactly the approximate result; backward: the exact products (straight-through)
            y = y_approx + (y - y.detach())
        if self.sigma is not None and self.training:
            y = y + torch.randn_like(y) * y.detach().std() * self.sigma
        return y

    # -------------------------------------------------------------- integer view
    @torch.no_grad()
    def integer_view(self, x: torch.Tensor) -> IntegerView:
        """The int8 operands, scales and zero points this layer uses for input ``x``."""
        s_x = self.activation_scale()
        s_w = self.weight_scale()
        return IntegerView(_round_clamp(x / s_x).to(torch.int8), _round_clamp(self.weight / self._wshape(s_w)).to(torch.int8),
                           float(s_x), s_w.clone(), 0, 0, None if self.bias is None else self.bias.detach().clone())

    @torch.no_grad()
    def integer_accumulate(self, x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
        """Exact int32 accumulation of exact int8 products (float64 arithmetic on integers, then int32)."""
        acc = self._op(x_q.to(torch.float64), w_q.to(torch.float64), None)
        return torch.round(acc).to(torch.int32)

    @torch.no_grad()
    def integer_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Output from the integer view: int32 accumulation of exact products, dequantised, plus bias."""
        v = self.integer_view(x)
        acc = self.integer_accumulate(v.x_q, v.w_q)
        y = acc.to(torch.float32) * (torch.tensor(v.x_scale) * self._oshape(v.w_scale, acc.dim()))
        if v.bias is not None:
            y = y + self._oshape(v.bias, acc.dim())
        return y

    @torch.no_grad()
    def float_module(self) -> nn.Module:
        """A plain ``nn.Conv2d`` / ``nn.Linear`` holding this layer's weights on their int8 grid (``w_q * s_w``)
        and its bias, without activation quantisation: what a runtime's own int8 quantisation starts from
        (:func:`moco.deploy.export` uses it for a QAT model's int8 graph). Raises for an approximate multiplier."""
        if self.multiplier is not None:
            raise MocoError(f"layer {self.layer_name or type(self).__name__} simulates an approximate multiplier, "
                            "which has no float or ONNX form")
        s_w = self._wshape(self.weight_scale())
        w = _round_clamp(self.weight.detach() / s_w) * s_w
        if isinstance(self, nn.Conv2d):
            new = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                            self.dilation, self.groups, self.bias is not None, self.padding_mode)
        else:
            new = nn.Linear(self.in_features, self.out_features, self.bias is not None)
        new = new.to(device=self.weight.device, dtype=self.weight.dtype)
        new.weight.copy_(w)
        if self.bias is not None:
            new.bias.copy_(self.bias.detach())
        return new.train(self.training)

    @property
    def fan_in(self) -> int:
        """Products summed per output element (``in / groups * kh * kw`` or ``in_features``)."""
        return int(self.weight[0].numel())


class QuantConv2d(QuantLayer, nn.Conv2d):
    """``nn.Conv2d`` with 8-bit fake quantisation of input and weight (see :mod:`moco.approx.quant`)."""

    def _op(self, x, w, bias):
        if self.padding_mode != "zeros":
            raise MocoError(f"layer {self.layer_name}: padding_mode {self.padding_mode!r} is not supported; use 'zeros'")
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)


class QuantLinear(QuantLayer, nn.Linear):
    """``nn.Linear`` with 8-bit fake quantisation of input and weight (see :mod:`moco.approx.quant`)."""

    def _op(self, x, w, bias):
        return F.linear(x, w, bias)


def rebuild_as(layer: nn.Module, cls: type) -> nn.Module:
    """A ``cls`` module sharing ``layer``'s parameters, buffers and settings (no re-initialisation)."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.__dict__.update(layer.__dict__)
    for key in ("_parameters", "_buffers", "_modules"):
        setattr(new, key, dict(getattr(layer, key)))
    return new


def _convert(layer: nn.Module, cls: type, *, per_channel: bool, observer: str, momentum: float, name: str):
    new = rebuild_as(layer, cls)
    new._setup_quant(per_channel, observer, momentum)
    new.layer_name = name
    return new


def quant_layers(model: nn.Module) -> list[tuple[str, QuantLayer]]:
    """``(name, layer)`` of every quantised layer of ``model``, in ``named_modules`` order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def replace_layers(model: nn.Module, names: list[str], build) -> None:
    """Replace each named submodule of ``model`` (in place) by ``build(name, module)``."""
    for name in names:
        _set_module(model, name, build(name, model.get_submodule(name)))


def quantize(
    model: nn.Module,
    calibration_data: Any,
    *,
    layers: list[str] | None = None,
    per_channel: bool = False,
    observer: str = "frozen",
    momentum: float = 0.1,
    batch_size: int = 256,
    max_samples: int | None = 2048,
) -> nn.Module:
    """A copy of ``model`` with 8-bit fake-quantised Conv2d/Linear layers, calibrated on data.

    ``layers``: names to quantise (default: every ``nn.Conv2d`` and ``nn.Linear``); naming another
    type raises MocoError. ``calibration_data``: inputs (tensor, ``(x, y)``, Dataset or DataLoader);
    the first ``max_samples`` (None: all) set each layer's activation range. The original model is
    not modified; the copy keeps its ``training`` flag.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if calibration_data is None:
        raise MocoError("quantize needs calibration_data (a few hundred training inputs) to set activation ranges")
    modules = dict(model.named_modules())
    if layers is None:
        layers = [n for n, m in modules.items() if isinstance(m, _SUPPORTED) and not isinstance(m, QuantLayer)]
        if not layers:
            raise MocoError("the model has no nn.Conv2d or nn.Linear layer to quantise")
    for n in layers:
        if n not in modules:
            raise MocoError(f"layer {n!r} is not in the model; choose from: {', '.join(k for k in modules if k)}")
        m = modules[n]
        if not isinstance(m, _SUPPORTED) or type(m) not in (nn.Conv2d, nn.Linear):
            raise MocoError(f"layer {n!r} is a {type(m).__name__}: not supported; moco.approx quantises "
                            "nn.Conv2d and nn.Linear (convert other layers first or leave them out of layers=)")
    q = copy.deepcopy(model)
    replace_layers(q, layers, lambda n, m: _convert(m, QuantConv2d if isinstance(m, nn.Conv2d) else QuantLinear,
                                                    per_channel=per_channel, observer=observer, momentum=momentum,
                                                    name=n))
    return calibrate(q, calibration_data, batch_size=batch_size, max_samples=max_samples)


@torch.no_grad()
def calibrate(model: nn.Module, data: Any, *, batch_size: int = 256, max_samples: int | None = 2048) -> nn.Module:
    """Set every quantised layer's activation range to the max |input| over ``data`` (eval mode); returns ``model``."""
    layers = quant_layers(model)
    if not layers:
        raise MocoError("the model has no quantised layers; call moco.approx.quantize first")
    try:
        n = num_samples(data)
    except TypeError as exc:
        raise MocoError(f"calibration data: {exc}") from None
    if n == 0:
        raise MocoError("calibration data is empty; pass a few hundred training inputs")
    was = model.training
    model.eval()
    for _, m in layers:
        m.act_max.zero_()
        m.calibrating = True
    try:
        run_batches(model, data, batch_size, max_samples)
    finally:
        for _, m in layers:
            m.calibrating = False
        model.train(was)
    for name, m in layers:
        if not float(m.act_max) > 0:
            raise MocoError(f"layer {name!r} saw only zeros during calibration; calibrate on real inputs")
    return model


def limited_batches(data: Any, batch_size: int, max_samples: int | None) -> Iterator[tuple[torch.Tensor, Any]]:
    """``iter_batches(data, batch_size)`` cut after ``max_samples`` samples (None: all)."""
    seen = 0
    for x, y in iter_batches(data, batch_size):
        if max_samples is not None and seen >= max_samples:
            return
        if max_samples is not None and seen + len(x) > max_samples:
            x = x[: max_samples - seen]
        seen += len(x)
        yield x, y


def run_batches(model: nn.Module, data: Any, batch_size: int, max_samples: int | None) -> int:
    """Run ``model`` over :func:`limited_batches` of ``data`` (for its hooks and observers); returns the samples
    seen. MocoError for NaN/inf inputs (they would survive the clamp to int8 codes) and for a first batch
    the model cannot take (a wrong shape or dtype)."""
    seen = 0
    for x, _ in limited_batches(data, batch_size, max_samples):
        if not torch.isfinite(x).all():
            raise MocoError("the inputs contain NaN or inf; clean or normalise the data first")
        try:
            model(x)
        except RuntimeError as exc:
            if seen:
                raise
            raise input_error(exc, tuple(x.shape)) from None
        seen += len(x)
    return seen


@dataclass(frozen=True)
class QDQExport:
    """An exported QAT model: ``path`` of the ONNX QDQ graph, the ``exporter`` used, and the check on the
    example input against the PyTorch QAT model: ``max_abs_diff`` of the outputs and ``agreement``
    (fraction of equal argmax predictions)."""

    path: str
    exporter: str
    max_abs_diff: float
    agreement: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def to_text(self) -> str:
        return (f"{self.path} ({self.exporter}): ONNX Runtime vs PyTorch max |diff| {self.max_abs_diff:.3g}, "
                f"agreement {self.agreement:.2%}")

    def __str__(self) -> str:
        return self.to_text()


def export_qdq(model: nn.Module, path: Any, example_input: torch.Tensor) -> QDQExport:
    """Export a QAT model (from :func:`quantize`) as an ONNX QDQ graph for ONNX Runtime int8, and check it.

    Each quantised layer exports its learned scales as QuantizeLinear/DequantizeLinear pairs on the
    input and the weight (zero point 0), through :func:`moco.deploy.exporter.export_onnx`. LUT layers
    cannot be exported (an approximate multiplier is not an ONNX operator): MocoError. The model is
    not modified (a copy is exported). ``example_input`` (a batch) is run through both.
    """
    from moco.deploy.exporter import export_onnx

    layers = quant_layers(model)
    if not layers:
        raise MocoError("the model has no quantised layers; quantise it first (moco.approx.quantize)")
    lut = [n for n, m in layers if m.multiplier is not None]
    if lut:
        raise MocoError(f"layers {lut} simulate approximate multipliers, which ONNX cannot express; export the "
                        "int8 QAT model instead")
    m = copy.deepcopy(model).eval()
    for _, layer in quant_layers(m):
        layer.sigma = None
        layer.export_qdq = True
    exporter = export_onnx(m, example_input[:1], path)
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": example_input.detach().numpy()})[0]
    was = model.training
    model.eval()
    with torch.no_grad():
        ref = model(example_input).numpy()
    model.train(was)
    return QDQExport(str(path), exporter, float(np.abs(got - ref).max()),
                     float(np.mean(got.argmax(1) == ref.argmax(1))))
