"""Stream pooled layer responses into per-layer :class:`RunningCovariance` accumulators.

Two sources:

* a model and data: one forward pass per batch; a global forward hook (filtered by module identity,
  removed afterwards, nothing registered on the model) pools each chosen module's output to
  ``[B, units]`` and the batch is merged into float64 statistics at once, so only one batch of
  responses is ever held;
* an iterable of ``{layer: [B, units] array}`` batches (pre-computed responses, like DNIKit's
  producers); ``[B, C, H, W]`` arrays are pooled the same way.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from moco.capture import _resolve_layers, iter_layer_outputs
from moco.compress.pfa.responses import activation_probe, call_counts
from moco.compress.pfa.stats import RunningCovariance
from moco.errors import MocoError
from moco.progress import show_progress

__all__ = ["Accumulator", "ModelProducer", "default_layers", "pooler", "stream_model", "stream_responses"]

Pooler = Callable[[Any], Any]


def pooler(pooling: str | Callable | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The spatial pooling applied to ``[B, C, H, W]`` responses: "max", "avg"/"mean", None or a callable.

    ``[B, units]`` responses pass through unchanged; a callable must return ``[B, units]``.
    """
    if callable(pooling):
        return pooling
    if pooling not in ("max", "avg", "mean", None):
        raise MocoError(f"pooling must be 'max', 'avg' (or 'mean'), None or a callable, got {pooling!r}")

    def pool(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return x
        if pooling is None:
            raise MocoError(f"a response has shape {tuple(x.shape)}, not [B, units]; pass pooling='max' or 'avg'")
        if x.dim() < 3:
            raise MocoError(f"cannot pool a response of shape {tuple(x.shape)}; expected [B, C, ...] or [B, units]")
        dims = tuple(range(2, x.dim()))
        return x.amax(dim=dims) if pooling == "max" else x.mean(dim=dims)

    return pool


class Accumulator:
    """Per-layer running statistics plus the number of samples with NaN/inf responses."""

    def __init__(self) -> None:
        self.stats: dict[str, RunningCovariance] = {}
        self.nonfinite: dict[str, int] = {}

    def add(self, name: str, pooled: Any) -> None:
        """Merge one ``[B, units]`` batch of ``name``'s pooled responses (float64; non-finite rows counted, dropped)."""
        if isinstance(pooled, torch.Tensor):
            pooled = pooled.detach().cpu().numpy()
        arr = np.asarray(pooled)
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise MocoError(f"responses of {name!r} are not numeric (dtype {arr.dtype})")
        if arr.ndim != 2:
            raise MocoError(f"pooled responses of {name!r} must be [B, units], got shape {arr.shape}")
        acc = self.stats.setdefault(name, RunningCovariance())
        try:
            xs = acc.shifted(arr)  # one pass: float64 conversion and shift
        except MocoError as err:
            raise MocoError(f"layer {name!r}: {err}") from None
        sums = xs.sum(axis=0)
        if not np.isfinite(sums).all():  # NaN/inf rows (rare): count and drop them
            finite = np.isfinite(xs).all(axis=1)
            self.nonfinite[name] = self.nonfinite.get(name, 0) + int((~finite).sum())
            xs = xs[finite]
            sums = None
        acc.add_shifted(xs, sums)


def default_layers(model: nn.Module) -> list[str]:
    """Every ``Conv2d`` and ``Linear`` module except the last one in module order (the classifier)."""
    names = [n for n, m in model.named_modules() if n and isinstance(m, (nn.Conv2d, nn.Linear))]
    if len(names) < 2:
        raise MocoError(
            f"{type(model).__name__} has no Conv2d/Linear layer besides its classifier; pass layers=[...] "
            "with the qualified names (model.named_modules()) of the layers to analyse"
        )
    return names[:-1]


def _first_sample(data: Any) -> torch.Tensor:
    """One input sample ``[1, ...]`` of ``data`` (a tensor, an (x, y) pair, a Dataset or a DataLoader)."""
    from moco.batches import iter_batches

    for x, _ in iter_batches(data, 1):
        return x[:1]
    raise MocoError("the data yielded no samples; nothing to introspect")


class ModelProducer:
    """A DNIKit-style producer over a model: ``producer(batch_size)`` yields ``{layer: pooled [B, units]}`` batches.

    The equivalent of DNIKit's ``pipeline(dataset, model(responses), Pooler(...))``: each call runs the
    model over ``data`` in batches (eval mode, inference mode, flags restored, nothing registered on
    the model) and yields, per batch, the pooled response of every layer. Layers named by their
    ``Conv2d`` / ``Linear`` are read after their BatchNorm/activation chain (``response="activation"``,
    see :mod:`moco.compress.pfa.responses`); ``described`` says which tensor each layer is.
    """

    def __init__(self, model: nn.Module, data: Any, layers: list[str] | None = None, *,
                 pooling: str | Callable | None = "max", response: str = "activation", progress: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if response not in ("activation", "output"):
            raise MocoError(f"response must be 'activation' (after the layer's BatchNorm/activation) or 'output', "
                            f"got {response!r}")
        names = default_layers(model) if layers is None else ([layers] if isinstance(layers, str) else list(layers))
        # a default layer called more than once per forward pass (weight sharing), or never, has no one response:
        # it is reported in failed_responses and the others are analysed (named explicitly, capture refuses it)
        self.skipped: dict[str, str] = {}
        if layers is None:
            counts = call_counts(model, _first_sample(data))
            for n in names:
                c = counts.get(n, 1) if counts else 1  # {}: untraceable, capture reports what it finds
                if c > 1:
                    self.skipped[n] = (f"module {n!r} runs {c} times per forward pass (weight sharing): its responses "
                                       "mix the calls, so it is not analysed")
                elif c == 0:  # e.g. attention's out_proj, whose weights F.multi_head_attention_forward reads
                    self.skipped[n] = (f"module {n!r} is never called as a module in the forward pass (its parent "
                                       "uses its weights directly), so it has no response to analyse")
            names = [n for n in names if n not in self.skipped]
            if not names:
                raise MocoError(f"no default layer runs exactly once per forward pass ({', '.join(self.skipped)}); "
                                "pass layers=[...] with layers that run once")
        self.layers = list(_resolve_layers(model, names))
        if response == "activation":
            self._probe, taps, self.described = activation_probe(model, self.layers)
        else:
            self._probe, taps = model, {n: n for n in self.layers}
            self.described = {n: f"{n} (its own output)" for n in self.layers}
        self._layer_of = {tap: name for name, tap in taps.items()}
        self._data, self._pool, self._progress = data, pooler(pooling), progress

    def __call__(self, batch_size: int = 500):
        """Yield ``{layer: pooled responses [B, units] (torch tensor)}`` per batch of ``batch_size`` samples."""
        with contextlib.closing(iter_layer_outputs(self._probe, self._data, list(self._layer_of),
                                                   batch_size=batch_size, processor=self._pool,
                                                   progress=self._progress, desc="PFA introspect")) as batches:
            for outputs in batches:
                yield {self._layer_of[tap]: value for tap, value in outputs.items()}


def stream_model(model: nn.Module, data: Any, layers: list[str] | None, pool: Callable, batch_size: int,
                 progress: bool, response: str = "activation"
                 ) -> tuple[Accumulator, list[str], dict[str, str], dict[str, str]]:
    """Run ``model`` over ``data`` and accumulate the pooled responses of ``layers`` (qualified names).

    Returns the accumulator, the layer names, ``{layer: what was captured}`` (see :class:`ModelProducer`)
    and ``{default layer skipped: why}``.
    """
    producer = ModelProducer(model, data, layers, pooling=pool, response=response, progress=progress)
    acc = Accumulator()
    start = 0
    for batch in producer(batch_size):
        for name, value in batch.items():
            acc.add(name, value)  # checks the pooled shape is [B, units]
        start += next(iter(batch.values())).shape[0]
    if start == 0:
        raise MocoError("the data yielded no samples; nothing to introspect")
    return acc, producer.layers, producer.described, dict(producer.skipped)


def _fields(batch: Any) -> Mapping:
    if isinstance(batch, Mapping):
        return batch
    fields = getattr(batch, "fields", None)
    if isinstance(fields, Mapping):
        return fields
    raise TypeError(
        f"each batch of responses must be a mapping {{layer name: [B, units] array}}, got {type(batch).__name__}; "
        "to analyse a model on data, pass model=..."
    )


def stream_responses(source: Iterable, layers: list[str] | None, pool: Callable,
                     progress: bool) -> tuple[Accumulator, list[str]]:
    """Accumulate an iterable of ``{layer: [B, units]}`` batches (``[B, C, H, W]`` is pooled)."""
    if isinstance(source, Mapping):
        source = [source]
    if isinstance(source, (torch.Tensor, np.ndarray, str, bytes)) or not isinstance(source, Iterable):
        raise TypeError(
            f"source is a {type(source).__name__}: pass model=... to analyse a model on this data, or an "
            "iterable of {layer name: [B, units] array} batches of pre-computed responses"
        )
    wanted = None if layers is None else list(layers)
    order: list[str] = []
    acc = Accumulator()
    batches = 0
    for batch in tqdm(source, desc="PFA introspect", unit="batch", disable=not show_progress(progress), leave=False):
        fields = _fields(batch)
        batches += 1
        for name, value in fields.items():
            if wanted is not None and name not in wanted:
                continue
            if not isinstance(name, str):
                raise TypeError(f"layer names must be str, got {type(name).__name__}")
            t = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
            if t.dim() >= 1 and not (t.is_floating_point() or t.dtype in (torch.int8, torch.int16, torch.int32,
                                                                             torch.int64, torch.uint8, torch.bool)):
                raise MocoError(f"responses of {name!r} have dtype {t.dtype}; pass real numbers")
            if t.dim() > 2 or (t.dim() >= 1 and not t.is_floating_point()):
                t = t.to(torch.float64)  # pool in float64; [B, units] floats go to the accumulator as they are
            pooled = pool(t)
            if name not in acc.stats:
                order.append(name)
            acc.add(name, pooled)
    if batches == 0:
        raise MocoError("the source yielded no batches; nothing to introspect")
    if wanted is not None:
        missing = [n for n in wanted if n not in acc.stats]
        if missing:
            raise MocoError(f"layers {missing} never appeared in the batches; layers seen: {order}")
        order = [n for n in wanted]
    if not order:
        raise MocoError("the batches held no responses; each batch must map layer names to [B, units] arrays")
    return acc, order
