"""Exit heads: small classifiers attached to an intermediate activation.

A head *factory* builds a head for an activation shape (without the batch dimension, e.g.
``(16, 28, 28)`` or ``(128,)``) and a number of classes. Built in:

* :func:`pool_linear` (``"pool_linear"``): adaptive average pool to ``pool_size x pool_size``,
  flatten, linear. Cheapest; on a flat ``[B, D]`` activation it is a single linear layer.
* :func:`conv_pool_linear` (``"conv_pool_linear"``): 3x3 conv (stride 2) + BatchNorm + ReLU, then
  pool and linear. Much stronger on early, low-level feature maps, at the price of one small conv.
* :func:`sep_conv_pool_linear` (``"sep_conv_pool_linear"``): depthwise-separable conv blocks, then pool
  and linear: a deeper head for an early point at few MACs.
* ``"auto"`` (the default of ``attach_exits``): per point the strongest of these that costs at most 5%
  of the model's MACs (:func:`choose_head`), so a small model does not pay more for its heads than
  its exits save.

Any callable ``factory(in_shape, num_classes) -> nn.Module`` works as a custom head; it must map
``[B, *in_shape]`` to logits ``[B, num_classes]`` (checked when the exits are attached).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from moco.errors import MocoError

__all__ = ["PoolLinearHead", "ConvPoolLinearHead", "SepConvPoolLinearHead", "HeadFactory", "pool_linear",
           "conv_pool_linear", "sep_conv_pool_linear", "choose_head", "get_head_factory", "head_spec",
           "head_macs"]


class PoolLinearHead(nn.Module):
    """``AdaptiveAvgPool2d(pool_size) -> Flatten -> Linear`` for ``[B, C, H, W]``; ``Linear`` for ``[B, D]``."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, pool_size: int = 1):
        super().__init__()
        if len(in_shape) == 3:
            self.pool = nn.AdaptiveAvgPool2d(pool_size)
            features = in_shape[0] * pool_size * pool_size
        elif len(in_shape) == 1:
            self.pool = nn.Identity()
            features = in_shape[0]
        else:
            raise MocoError(f"pool_linear heads take [B, C, H, W] or [B, D] activations, got [B, *{tuple(in_shape)}]")
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(x)))


def _require_feature_map(head: str, in_shape: tuple[int, ...]) -> None:
    """Raise a clear error when a convolutional head is attached where the activation is not ``[B, C, H, W]``."""
    if len(in_shape) != 3:
        raise MocoError(
            f"{head} heads need a [B, C, H, W] activation, got [B, *{tuple(in_shape)}]; "
            f"use head='pool_linear' at this point"
        )


class ConvPoolLinearHead(nn.Module):
    """``Conv3x3(C -> channels, stride) -> BN -> ReLU`` (``depth`` times, the width doubling after the
    first) ``-> AdaptiveAvgPool2d(pool_size) -> Flatten -> Linear``."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, channels: int | None = None, stride: int = 2,
                 pool_size: int = 2, depth: int = 1):
        super().__init__()
        _require_feature_map("conv_pool_linear", in_shape)
        c = int(in_shape[0])
        width = int(channels) if channels else max(16, 2 * c)
        self.conv = nn.Conv2d(c, width, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        # deeper heads: each further block doubles the width and halves the map (stride 2) again
        blocks = []
        for _ in range(depth - 1):
            blocks += [nn.Conv2d(width, 2 * width, 3, stride, 1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU()]
            width *= 2
        self.more = nn.Sequential(*blocks) if blocks else None
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(width * pool_size * pool_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn(self.conv(x)))
        if self.more is not None:
            h = self.more(h)
        return self.fc(self.flatten(self.pool(h)))


class SepConvPoolLinearHead(nn.Module):
    """Depthwise-separable blocks ``[DW3x3(stride) -> BN -> ReLU -> PW1x1(-> w) -> BN -> ReLU]`` for each
    width ``w``, then ``AdaptiveAvgPool2d(pool_size) -> Flatten -> Linear`` (MobileNet-style: depth for
    a fraction of the MACs of full 3x3 convs)."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, widths: tuple[int, ...] = (64, 128, 256),
                 stride: int = 2, pool_size: int = 2):
        super().__init__()
        _require_feature_map("sep_conv_pool_linear", in_shape)
        c = int(in_shape[0])
        layers: list[nn.Module] = []
        for w in widths:
            layers += [nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                       nn.Conv2d(c, int(w), 1, bias=False), nn.BatchNorm2d(int(w)), nn.ReLU()]
            c = int(w)
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c * pool_size * pool_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.body(x))))


@dataclass(frozen=True)
class HeadFactory:
    """A built-in head with its options: ``factory(in_shape, num_classes) -> nn.Module``; JSON-able via ``spec()``."""

    type: str
    options: tuple[tuple[str, Any], ...] = ()

    def __call__(self, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        cls = {"pool_linear": PoolLinearHead, "conv_pool_linear": ConvPoolLinearHead,
               "sep_conv_pool_linear": SepConvPoolLinearHead}[self.type]
        return cls(tuple(in_shape), num_classes, **dict(self.options))

    def spec(self) -> dict[str, Any]:
        """``{"type": ..., "options": {...}}``, rebuilt by :func:`get_head_factory`."""
        return {"type": self.type, "options": dict(self.options)}


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MocoError(f"{name} must be a positive int, got {value!r}")
    return value


def pool_linear(*, pool_size: int = 1) -> HeadFactory:
    """Head factory: average pool to ``pool_size`` x ``pool_size`` (1 = global), flatten, linear."""
    return HeadFactory("pool_linear", (("pool_size", _positive("pool_size", pool_size)),))


def conv_pool_linear(*, channels: int | None = None, stride: int = 2, pool_size: int = 2, depth: int = 1) -> HeadFactory:
    """Head factory: 3x3 conv to ``channels`` (default ``max(16, 2 * C)``) with ``stride``, BN, ReLU, pool, linear.

    ``depth > 1`` stacks further conv-BN-ReLU blocks (each doubling the width, same ``stride``) before
    the pool: a stronger head for an early, low-level point, at a few more MACs.
    """
    opts: list[tuple[str, Any]] = []
    if channels is not None:
        opts.append(("channels", _positive("channels", channels)))
    opts += [("stride", _positive("stride", stride)), ("pool_size", _positive("pool_size", pool_size))]
    if depth != 1:  # the spec of a one-conv head stays what it was (saved exits load unchanged)
        opts.append(("depth", _positive("depth", depth)))
    return HeadFactory("conv_pool_linear", tuple(opts))


def sep_conv_pool_linear(*, widths: tuple[int, ...] | list[int] = (64, 128, 256), stride: int = 2,
                         pool_size: int = 2) -> HeadFactory:
    """Head factory: depthwise-separable conv blocks (one per entry of ``widths``, each with ``stride``),
    pool, linear. On ResNet-18/0.25's first stage (16 x 28 x 28) the default costs 1.2 M MACs, less
    than two full 3x3 conv blocks (1.8 M), and classifies better."""
    if isinstance(widths, (str, bytes)) or not isinstance(widths, (list, tuple)) or not widths:
        raise MocoError(f"widths must be a non-empty list of positive ints, got {widths!r}")
    ws = tuple(_positive("each width", w) for w in widths)
    return HeadFactory("sep_conv_pool_linear", (("widths", ws), ("stride", _positive("stride", stride)),
                                                ("pool_size", _positive("pool_size", pool_size))))


_BUILT_IN = {"pool_linear": pool_linear, "conv_pool_linear": conv_pool_linear,
             "sep_conv_pool_linear": sep_conv_pool_linear}


def head_macs(factory: Callable[[tuple[int, ...], int], nn.Module], in_shape: tuple[int, ...], num_classes: int) -> int:
    """**MACs per sample** of the head ``factory`` builds for ``in_shape`` (counted by the profiler)."""
    from moco.profile import profile

    head = factory(tuple(in_shape), num_classes).eval()
    return int(profile(head, torch.zeros(1, *in_shape), latency=False).totals.macs)


def choose_head(in_shape: tuple[int, ...], num_classes: int, max_macs: float) -> HeadFactory:
    """The strongest built-in head for ``in_shape`` that costs at most ``max_macs`` MACs per sample.

    Tried from strongest to cheapest: two conv blocks, one conv block of the default width, of the
    input width, of half of it, then average-pool-to-2x2 + linear and global-pool + linear (always
    taken last, whatever it costs: an exit needs some head). ``attach_exits(head="auto")`` uses it with
    5% of the model's MACs, so that every head is small against the model it is attached to.
    """
    in_shape = tuple(int(s) for s in in_shape)
    candidates: list[HeadFactory] = []
    if len(in_shape) == 3:
        c = in_shape[0]
        candidates += [conv_pool_linear(depth=2), conv_pool_linear(), conv_pool_linear(channels=max(4, c)),
                       conv_pool_linear(channels=max(4, c // 2)), pool_linear(pool_size=2)]
    for factory in candidates:
        if head_macs(factory, in_shape, num_classes) <= max_macs:
            return factory
    return pool_linear()


def get_head_factory(head: Any) -> Callable[[tuple[int, ...], int], nn.Module]:
    """A head factory from a name, a spec dict (``HeadFactory.spec()``), a HeadFactory or any callable."""
    if isinstance(head, str):
        if head not in _BUILT_IN:
            raise MocoError(f"unknown head {head!r}; built in: {', '.join(_BUILT_IN)}, or pass a callable "
                            f"factory(in_shape, num_classes) -> nn.Module")
        return _BUILT_IN[head]()
    if isinstance(head, dict):
        kind = head.get("type")
        if kind not in _BUILT_IN:
            raise MocoError(f"head spec {head!r} is not a built-in head; pass the factory that built it (head=...)")
        return _BUILT_IN[kind](**dict(head.get("options") or {}))
    if isinstance(head, nn.Module):
        raise TypeError("head must be a factory(in_shape, num_classes) -> nn.Module, not a module instance "
                        "(one head is built per exit point)")
    if callable(head):
        return head
    raise TypeError(f"head must be a name, a spec dict or a callable factory, not {type(head).__name__}")


def head_spec(factory: Any) -> dict[str, Any]:
    """JSON spec of a factory: the built-in spec, or ``{"type": "custom", "name": ...}`` for a callable."""
    if isinstance(factory, HeadFactory):
        return factory.spec()
    return {"type": "custom", "name": getattr(factory, "__qualname__", type(factory).__name__)}


