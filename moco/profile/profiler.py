"""``profile(model, example_input)``: count and time every module of a model without changing it."""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from moco.errors import MocoError
from moco.profile.counting import CountingMode, Work
from moco.profile.latency import measure_latency
from moco.profile.report import LayerProfile, Profile
from moco.profile.tracking import CallTracker

__all__ = ["SCRIPTED_ATTRIBUTION", "profile"]


def _as_inputs(example_input: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    if isinstance(example_input, (tuple, list)) and example_input and all(
        isinstance(t, torch.Tensor) for t in example_input
    ):
        return tuple(example_input)
    got = type(example_input).__name__
    if isinstance(example_input, (tuple, list)):
        got = f"{got} of {[type(t).__name__ for t in example_input]}"
    raise TypeError(
        f"example_input must be a torch.Tensor (or a tuple of tensors, passed as model(*inputs)), got {got}; "
        "pass a batch such as torch.randn(1, 1, 28, 28), or convert with torch.as_tensor(...)"
    )


def _shape_of(inputs: tuple[torch.Tensor, ...]) -> tuple:
    shapes = tuple(tuple(int(s) for s in t.shape) for t in inputs)
    return shapes[0] if len(shapes) == 1 else shapes


def _output_shape(output: Any) -> tuple | None:
    tensors = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]
    if not tensors:
        return None
    shapes = tuple(tuple(int(s) for s in t.shape) for t in tensors)
    return shapes[0] if len(shapes) == 1 else shapes


def _output_bytes(output: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor))


@contextmanager
def _inference_mode_restored(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` and ``torch.no_grad()`` inside; every module's ``training`` flag restored after."""
    flags = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for module, training in flags:
            module.training = training


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}".rstrip(": ")


def _check_int(name: str, value: Any, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise MocoError(f"{name} must be >= {minimum}, got {value}")
    return value


class _OutputRecorder:
    """``on_exit`` callback: first output shape and summed output bytes per module name."""

    def __init__(self) -> None:
        self.shapes: dict[str, tuple | None] = {}
        self.bytes: Counter = Counter()

    def on_exit(self, name: str, output: Any) -> None:
        self.shapes.setdefault(name, _output_shape(output))
        self.bytes[name] += _output_bytes(output)


def profile(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[torch.Tensor],
    *,
    latency: bool = True,
    repeats: int = 3,
    warmup: int = 1,
) -> Profile:
    """Profile ``model(*example_input)``: work and time of every module, in eval mode, without grad.

    Counts (per batch of ``example_input``; divide by ``Profile.batch_size`` or use
    ``Profile.per_sample`` for one sample) are taken at the aten level by a ``TorchDispatchMode`` and
    attributed to the innermost model module executing, so functional ops in a custom ``forward``
    count for that module. ``macs`` are multiply-accumulates, ``flops = 2 * macs + elementwise_flops``
    (see :mod:`moco.profile` for the element-wise rules), ``activation_bytes`` bytes of the module's
    outputs. With ``latency`` every module's exclusive time is measured in seconds (median of
    ``repeats`` passes after ``warmup`` passes; the counting pass runs first and warms up too), and the
    whole forward pass without hooks (median of ``repeats``). Without latency the model runs once.

    Fused kernels are counted as their unfused reference paths: ``nn.TransformerEncoderLayer`` and
    ``nn.MultiheadAttention`` fast paths (QKV and output projections, ``QK^T`` and ``AV`` products,
    softmax, feed-forward, layer norms), ``F.scaled_dot_product_attention`` (dense: a causal or masked
    attention counts all ``Lq x Lk`` scores, as the math kernel computes them) and oneDNN LSTM layers
    (the 4 gate products per time step: ``T*B*4H*(I+H)`` MACs). A TorchScript model runs without
    Python module hooks, so its work is counted in full but lands in the root row: the profile says so
    in ``attribution`` and has no bottleneck.

    The model is not changed: hooks are global and removed afterwards, it runs under
    ``torch.no_grad()`` in eval mode and every module's ``training`` flag is restored on return.

    Raises ``TypeError`` when ``model`` is not an ``nn.Module`` or ``example_input`` is not a tensor
    (or tuple of tensors), ``MocoError`` when the model cannot run on the input's shape.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = _as_inputs(example_input)
    if not isinstance(latency, bool):
        raise TypeError(f"latency must be True or False, got {latency!r}")
    if latency:
        _check_int("repeats", repeats, 1)
        _check_int("warmup", warmup, 0)
    shape = _shape_of(inputs)
    if inputs[0].dim() > 0 and inputs[0].shape[0] == 0:
        raise MocoError(f"example_input has an empty batch (shape {shape}); give it at least one sample")

    with _inference_mode_restored(model):
        # One counted pass (no separate trial run: on failure the model alone is run to tell a model
        # that rejects the input, reported in one line, from an error of the counting itself).
        recorder = _OutputRecorder()
        tracker = CallTracker(model, on_exit=recorder.on_exit)
        try:
            with tracker, CountingMode(tracker.current) as mode:
                output = model(*inputs)
        except Exception:
            try:
                model(*inputs)
            except Exception as exc:  # the model rejects this input; say so in one line
                raise MocoError(f"the model could not run on input shape {shape}: {_last_line(exc)}") from None
            raise
        calls = dict(tracker.calls)
        timing = measure_latency(model, inputs, repeats=repeats, warmup=warmup) if latency else None

    return _build(model, inputs, shape, output, calls, recorder, mode, timing, repeats if latency else 0)


SCRIPTED_ATTRIBUTION = (
    "per-module rows unavailable: a TorchScript model runs its submodules without Python module hooks, "
    "so all work is counted in the root row (totals are exact); profile the eager model for per-module rows"
)
"""``Profile.attribution`` of a TorchScript (``torch.jit.script``/``trace``) model."""


def _type_name(module: nn.Module) -> str:
    """Class name; a TorchScript module's original class name (``Conv2d``, not ``RecursiveScriptModule``)."""
    if isinstance(module, torch.jit.ScriptModule):
        return getattr(module, "original_name", None) or type(module).__name__
    return type(module).__name__


def _build(model, inputs, shape, output, calls, recorder, mode, timing, repeats) -> Profile:
    scripted = isinstance(model, torch.jit.ScriptModule)
    seen_params: set[int] = set()
    rows: list[LayerProfile] = []
    for name, module in model.named_modules():
        own = 0
        for param in module.parameters(recurse=False):
            if id(param) not in seen_params:
                seen_params.add(id(param))
                own += param.numel()
        work = mode.by_module.get(name, Work())
        unsupported = mode.unsupported.get(name, Counter())
        n_calls = calls.get(name, 0)
        is_leaf = next(iter(module.children()), None) is None
        if not ((n_calls and (is_leaf or not work.is_zero() or unsupported)) or own):
            continue
        rows.append(LayerProfile(
            name=name, type=_type_name(module), calls=n_calls, output_shape=recorder.shapes.get(name),
            params=own, macs=work.macs, bias_flops=work.bias_flops, activation_flops=work.activation_flops,
            other_elementwise_flops=work.other_elementwise_flops, activation_bytes=recorder.bytes.get(name, 0),
            unsupported_ops=tuple(sorted(unsupported)),
        ))

    summed = Work()
    for row in rows:
        summed.add(Work(row.macs, row.bias_flops, row.activation_flops, row.other_elementwise_flops))
    total_params = sum(p.numel() for p in model.parameters())
    if summed.as_tuple() != mode.total.as_tuple() or sum(r.params for r in rows) != total_params:
        raise RuntimeError(
            f"moco.profile attribution lost work: rows sum to {summed.as_tuple()} and {sum(r.params for r in rows)} "
            f"params, the whole model counts {mode.total.as_tuple()} and {total_params} params"
        )

    forward_time = None
    total_latency = None
    if timing is not None:
        times = {row.name: timing.per_module_s.get(row.name, 0.0) for row in rows}
        total_latency = sum(times.values())
        rows = [
            _replace_latency(row, times[row.name], times[row.name] / total_latency if total_latency > 0 else 0.0)
            for row in rows
        ]
        forward_time = timing.forward_s

    totals = LayerProfile(
        name="total", type=_type_name(model), calls=1, output_shape=_output_shape(output),
        params=total_params, macs=summed.macs, bias_flops=summed.bias_flops,
        activation_flops=summed.activation_flops, other_elementwise_flops=summed.other_elementwise_flops,
        activation_bytes=sum(r.activation_bytes for r in rows), latency_s=total_latency,
        latency_share=1.0 if total_latency is not None else None,
        unsupported_ops=tuple(sorted(mode.unsupported_total)),
    )
    bottleneck = _argmax(rows, "macs")
    if bottleneck is None:
        bottleneck = _argmax(rows, "flops")
    if scripted:
        bottleneck = None
    slowest = _argmax(rows, "latency_s") if timing is not None else None
    first = inputs[0]
    return Profile(
        model_type=_type_name(model), input_shape=shape,
        batch_size=int(first.shape[0]) if first.dim() > 0 else 1,
        rows=tuple(rows), totals=totals, bottleneck=bottleneck, slowest=slowest,
        unsupported_ops=dict(sorted(mode.unsupported_total.items())), forward_time_s=forward_time,
        latency_repeats=repeats, attribution=SCRIPTED_ATTRIBUTION if scripted else "per module",
    )


def _replace_latency(row: LayerProfile, seconds: float, share: float) -> LayerProfile:
    return replace(row, latency_s=seconds, latency_share=share)


def _argmax(rows: list[LayerProfile], column: str) -> str | None:
    """Name of the first row with the largest positive ``column``; ``None`` if none is positive."""
    best, best_value = None, 0
    for row in rows:
        value = getattr(row, column) or 0
        if value > best_value:
            best, best_value = row.name, value
    return best
