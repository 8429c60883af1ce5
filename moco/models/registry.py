"""A registry of model constructors, in the style of timm: ``create(name, **kw)``, ``list_models()``."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from torch import nn

from moco.errors import MocoError

__all__ = ["ModelSpec", "create", "get_spec", "input_shape", "list_models", "register"]


@dataclass(frozen=True)
class ModelSpec:
    """One registered architecture.

    ``input_shape`` is the shape of one sample (C, H, W) the model expects by default; ``dataset`` names
    the dataset its seed document trains it on.
    """

    name: str
    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    dataset: str
    summary: str


_REGISTRY: dict[str, ModelSpec] = {}


def register(name: str, *, input_shape: tuple[int, ...], dataset: str):
    """Decorator: register ``factory`` under ``name``. The first docstring line becomes the summary."""

    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise RuntimeError(f"model {name!r} registered twice")
        summary = (inspect.getdoc(factory) or "").split("\n")[0]
        _REGISTRY[name] = ModelSpec(name, factory, tuple(input_shape), dataset, summary)
        return factory

    return deco


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` for ``name``; ``ValueError`` listing the choices when unknown."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise MocoError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}") from None


def create(name: str, **kwargs) -> nn.Module:
    """Build a fresh (untrained) model ``name`` with constructor keyword arguments ``kwargs``."""
    spec = get_spec(name)
    params = inspect.signature(spec.factory).parameters
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        raise TypeError(
            f"model {name!r} takes no argument(s) {unknown}; it accepts: {', '.join(params) or 'none'}"
        )
    return spec.factory(**kwargs)


def input_shape(name: str, **kwargs) -> tuple[int, ...]:
    """Shape (C, H, W) of one input sample for ``create(name, **kwargs)``."""
    spec = get_spec(name)
    shape = list(spec.input_shape)
    if "in_channels" in kwargs:
        shape[0] = int(kwargs["in_channels"])
    if "input_size" in kwargs:
        shape[1] = shape[2] = int(kwargs["input_size"])
    return tuple(shape)
