"""Constructor arguments of the modules surgery resizes, and their sliced, smaller copies.

Only exact ``torch.nn`` types are handled here (a subclass may have its own ``forward``): ``Conv2d``,
``Linear``, ``BatchNorm1d``/``BatchNorm2d``, ``LayerNorm`` (over the last dim) and ``PReLU``; plus the parameter-free layers a plain
``nn.Sequential`` is usually built from, so that such a model can be described in JSON entirely.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moco.compress.surgery.errors import SurgeryError

__all__ = ["SIZED_TYPES", "build_module", "describe_module", "resized_module"]

# Modules whose parameters depend on channel counts, and the attributes that are their constructor kwargs.
SIZED_TYPES: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    "Conv2d": (
        nn.Conv2d,
        ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"),
    ),
    "Linear": (nn.Linear, ("in_features", "out_features")),
    "BatchNorm1d": (nn.BatchNorm1d, ("num_features", "eps", "momentum", "affine", "track_running_stats")),
    "BatchNorm2d": (nn.BatchNorm2d, ("num_features", "eps", "momentum", "affine", "track_running_stats")),
    "PReLU": (nn.PReLU, ("num_parameters",)),
    "LayerNorm": (nn.LayerNorm, ("normalized_shape", "eps", "elementwise_affine")),
}

# Parameter-free modules that can be rebuilt from their attributes (used to describe a whole Sequential).
PLAIN_TYPES: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    "ReLU": (nn.ReLU, ("inplace",)),
    "ReLU6": (nn.ReLU6, ("inplace",)),
    "LeakyReLU": (nn.LeakyReLU, ("negative_slope", "inplace")),
    "ELU": (nn.ELU, ("alpha", "inplace")),
    "GELU": (nn.GELU, ("approximate",)),
    "SiLU": (nn.SiLU, ("inplace",)),
    "Hardswish": (nn.Hardswish, ("inplace",)),
    "Sigmoid": (nn.Sigmoid, ()),
    "Tanh": (nn.Tanh, ()),
    "Identity": (nn.Identity, ()),
    "Dropout": (nn.Dropout, ("p", "inplace")),
    "Dropout2d": (nn.Dropout2d, ("p", "inplace")),
    "MaxPool2d": (nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode")),
    "AvgPool2d": (
        nn.AvgPool2d,
        ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
    ),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, ("output_size",)),
    "AdaptiveMaxPool2d": (nn.AdaptiveMaxPool2d, ("output_size", "return_indices")),
    "Flatten": (nn.Flatten, ("start_dim", "end_dim")),
    "Softmax": (nn.Softmax, ("dim",)),
    "LogSoftmax": (nn.LogSoftmax, ("dim",)),
}

_ALL_TYPES = {**SIZED_TYPES, **PLAIN_TYPES}


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_from_json(v) for v in value)
    return value


def describe_module(module: nn.Module, *, plain: bool = False) -> dict | None:
    """``{"type": name, "kwargs": {...}}`` (JSON-ready) rebuilding ``module``'s structure, or None if not known.

    Only exact types count; ``plain=True`` also describes the parameter-free layers of :data:`PLAIN_TYPES`.
    """
    table = _ALL_TYPES if plain else SIZED_TYPES
    for name, (cls, attrs) in table.items():
        if type(module) is cls:
            kwargs = {a: _jsonable(getattr(module, a)) for a in attrs}
            if cls in (nn.Conv2d, nn.Linear, nn.LayerNorm):
                kwargs["bias"] = module.bias is not None
            if cls is nn.Flatten:
                kwargs = {"start_dim": module.start_dim, "end_dim": module.end_dim}
            return {"type": name, "kwargs": kwargs}
    return None


def build_module(spec: dict) -> nn.Module:
    """A fresh module from a :func:`describe_module` description (parameters are placeholders to be loaded)."""
    if not isinstance(spec, dict) or spec.get("type") not in _ALL_TYPES or not isinstance(spec.get("kwargs"), dict):
        raise SurgeryError(f"cannot rebuild module from description {spec!r}; known types: {', '.join(_ALL_TYPES)}")
    cls = _ALL_TYPES[spec["type"]][0]
    kwargs = {k: _from_json(v) for k, v in spec["kwargs"].items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, RuntimeError) as err:
        raise SurgeryError(f"cannot rebuild {spec['type']} from {spec['kwargs']}: {err}") from err


def _select(t: torch.Tensor | None, dim: int, idx: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    t = t.detach()
    return (t if idx is None else t.index_select(dim, idx.to(t.device))).clone()


def _param(old: nn.Parameter | None, value: torch.Tensor | None) -> nn.Parameter | None:
    if old is None or value is None:
        return None
    return nn.Parameter(value, requires_grad=old.requires_grad)


def resized_module(
    module: nn.Module,
    *,
    out_idx: torch.Tensor | None,
    in_idx: torch.Tensor | None,
    groups: int | None = None,
) -> nn.Module:
    """A new module like ``module`` keeping output units ``out_idx`` and input units ``in_idx`` (None: all).

    Conv2d: ``out_idx`` selects filters; ``in_idx`` selects input channels of an ungrouped conv; for a
    grouped conv (``groups`` = the new group count) whole groups are kept, so only filters are selected.
    Linear: rows ``out_idx``, columns ``in_idx``. BatchNorm / LayerNorm / PReLU: ``out_idx`` selects the channels
    (weights, bias and running statistics). The result is on the same device and dtype, same training flag.
    """
    kind = describe_module(module)
    if kind is None:
        raise SurgeryError(f"cannot resize a {type(module).__name__}")
    kwargs = dict(kind["kwargs"])
    weight = module.weight if hasattr(module, "weight") else None
    factory = {"device": weight.device, "dtype": weight.dtype} if weight is not None else {}
    if isinstance(module, nn.Conv2d):
        if module.groups == 1:
            w = _select(_select(module.weight, 0, out_idx), 1, in_idx)
        else:
            w = _select(module.weight, 0, out_idx)
        kwargs["out_channels"] = int(w.shape[0])
        kwargs["groups"] = int(groups if groups is not None else module.groups)
        kwargs["in_channels"] = int(w.shape[1]) * kwargs["groups"]
        new = nn.Conv2d(**{k: _from_json(v) for k, v in kwargs.items()}, **factory)
        new.weight = _param(module.weight, w)
        new.bias = _param(module.bias, _select(module.bias, 0, out_idx))
    elif isinstance(module, nn.Linear):
        w = _select(_select(module.weight, 0, out_idx), 1, in_idx)
        kwargs.update(out_features=int(w.shape[0]), in_features=int(w.shape[1]))
        new = nn.Linear(**kwargs, **factory)
        new.weight = _param(module.weight, w)
        new.bias = _param(module.bias, _select(module.bias, 0, out_idx))
    elif isinstance(module, nn.LayerNorm):
        size = module.normalized_shape[-1] if out_idx is None else int(out_idx.numel())
        kwargs["normalized_shape"] = (size,)
        new = nn.LayerNorm(**kwargs, **factory)
        if module.elementwise_affine:
            new.weight = _param(module.weight, _select(module.weight, 0, out_idx))
            new.bias = _param(module.bias, _select(module.bias, 0, out_idx))
    elif isinstance(module, nn.PReLU):
        w = _select(module.weight, 0, out_idx)
        new = nn.PReLU(num_parameters=int(w.shape[0]), **factory)
        new.weight = _param(module.weight, w)
    else:  # BatchNorm1d / BatchNorm2d
        ref = module.running_mean if module.running_mean is not None else module.weight
        kwargs["num_features"] = module.num_features if out_idx is None else int(out_idx.numel())
        new = type(module)(**kwargs, **({"device": ref.device, "dtype": ref.dtype} if ref is not None else {}))
        if module.affine:
            new.weight = _param(module.weight, _select(module.weight, 0, out_idx))
            new.bias = _param(module.bias, _select(module.bias, 0, out_idx))
        if module.track_running_stats and module.running_mean is not None:
            new.running_mean = _select(module.running_mean, 0, out_idx)
            new.running_var = _select(module.running_var, 0, out_idx)
            new.num_batches_tracked = module.num_batches_tracked.detach().clone()
    new.train(module.training)
    return new
