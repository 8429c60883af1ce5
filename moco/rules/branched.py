"""Rule-based early exit (seed 000): a linear rule on an intermediate layer decides that a sample's
prediction is already known, so that sample skips the rest of the network.

:class:`BranchedNetwork` splits a model with :func:`moco.split.split_at` into a head (up to the
split layer) and a tail (the rest). Every batch runs the head; the rule looks at the head output
flattened to ``[B, D]`` and picks the samples that exit; only the other samples run the tail.

:func:`expected_macs` predicts the cost of that network from :func:`moco.profile.profile`, and
:func:`suggest_layer` chooses the split layer: it fits rules at every candidate layer before the
model's bottleneck and keeps the one that saves the most MACs.

Cost model (all counts are **MACs per sample**, multiply-accumulates as :mod:`moco.profile` counts
them)::

    expected = head_macs + rule_macs + (1 - coverage) * tail_macs,   rule_macs = D * num_classes

where ``coverage`` is the fraction of samples that exit early and the rule costs one
``[D] x [D, num_classes]`` matrix product per sample. Element-wise work (biases, activations,
the exit bookkeeping) is not part of the MAC count.

The rule interface (duck-typed; :class:`moco.rules.rule.LinearRule` and ``RuleSet`` provide it):

* ``rule.assign(features) -> (mask, classes)``: ``features`` float32 ``[B, D]``; ``mask`` a bool
  tensor ``[B]``, True where the sample exits; ``classes`` an integer tensor ``[B]``, the predicted
  class where ``mask`` is True (anything elsewhere).
* ``rule.num_classes`` (int): the width of the model output; ``rule.n_features`` (int): ``D``;
  ``rule.layer``: the split layer the rule was fitted at (int or str), or None when unknown.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from moco.batches import iter_batches
from moco.capture import build_embeddings_and_predictions
from moco.errors import MocoError
from moco.progress import show_progress
from moco.split import ModelSplit, split_at, split_boundaries

__all__ = [
    "BranchedNetwork",
    "CostEstimate",
    "LayerCandidate",
    "LayerSuggestion",
    "expected_macs",
    "suggest_layer",
]

OUTPUTS = ("onehot", "classes")
"""Values of ``BranchedNetwork(output=...)``."""


# ---------------------------------------------------------------------------- helpers


def _layer_label(layer: int | str) -> str:
    return repr(layer) if isinstance(layer, str) else str(layer)


def _is_plain_sequential(model: nn.Module) -> bool:
    return isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward


def _check_layer_type(layer: Any) -> None:
    if isinstance(layer, bool) or not isinstance(layer, (int, str)):
        raise TypeError(f"layer must be an int split index or a str module name, not {type(layer).__name__}")


def _rule_int(rule: Any, name: str) -> int:
    value = getattr(rule, name, None)
    if value is None:
        raise TypeError(f"the rule ({type(rule).__name__}) has no {name!r} attribute; pass a LinearRule or RuleSet")
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise MocoError(f"rule.{name} must be a positive int, got {value!r}")
    return int(value)


def _check_rule(rule: Any) -> None:
    if rule is None:
        raise TypeError("rule is required: pass a fitted LinearRule or RuleSet (anything with assign())")
    if not callable(getattr(rule, "assign", None)):
        raise TypeError(
            f"the rule ({type(rule).__name__}) has no assign(features) method; pass a LinearRule or RuleSet"
        )
    _rule_int(rule, "num_classes")
    _rule_int(rule, "n_features")


def _same_layer(rule_layer: int | str, layer: int | str, split: ModelSplit) -> bool:
    """True when ``rule_layer`` names the same split as ``layer`` (``2`` and ``"1"`` of a Sequential)."""
    if isinstance(rule_layer, bool):
        return False
    if rule_layer == layer or rule_layer == split.point:
        return True
    return split.index is not None and isinstance(rule_layer, int) and rule_layer == split.index


def _assign(rule: Any, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``rule.assign(features)`` with its outputs checked: bool mask ``[B]``, int64 classes ``[B]``."""
    result = rule.assign(features)
    if not isinstance(result, tuple) or len(result) != 2:
        raise MocoError(f"rule.assign must return (mask, classes), got {type(result).__name__}")
    mask, classes = result
    b = features.shape[0]
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (b,):
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise MocoError(f"rule.assign must return a bool mask of shape ({b},), got {got}")
    if (
        not isinstance(classes, torch.Tensor)
        or classes.is_floating_point()
        or classes.is_complex()
        or tuple(classes.shape) != (b,)
    ):
        got = f"{classes.dtype} {tuple(classes.shape)}" if isinstance(classes, torch.Tensor) else type(classes).__name__
        raise MocoError(f"rule.assign must return integer classes of shape ({b},), got {got}")
    return mask, classes.long()


def _last_line(exc: BaseException) -> str:
    lines = [t.strip() for t in str(exc).strip().splitlines() if t.strip()]
    return lines[-1] if lines else type(exc).__name__


def _check_input(x: Any) -> torch.Tensor:
    """A floating batch tensor without NaN or inf, else TypeError / MocoError naming the problem."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor batch [B, ...], not {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"input has dtype {x.dtype}; pass floating-point inputs (e.g. x.float(), normalised as in training)")
    if x.dim() == 0:
        raise MocoError("input is a 0-d tensor; pass a batch with a leading batch dimension")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise MocoError("the input contains NaN or inf; clean or normalise the data first")
    return x


POOLINGS = (None, "flatten", "max", "avg")
"""Values of ``BranchedNetwork(pooling=...)`` besides a processor instance (as in :func:`moco.capture.capture`)."""


def _pooling(pooling: Any):
    """The processor for ``pooling``: None (flatten), ``"max"``/``"avg"`` (:class:`moco.capture.SpatialPool`)
    or a processor instance (``Flatten()``, ``SpatialPool(kind)``, any callable ``[B, ...] -> [B, ...]``)."""
    from moco.capture import Flatten, SpatialPool

    if pooling is None or pooling == "flatten" or isinstance(pooling, Flatten):
        return None
    if pooling in ("max", "avg"):
        return SpatialPool(pooling)
    if callable(pooling) and not isinstance(pooling, str):
        return pooling
    raise MocoError(f"pooling must be one of {POOLINGS[1:]}, None, or a processor such as SpatialPool('max'); "
                    f"got {pooling!r}")


def _output_width(model: nn.Module, example_input: torch.Tensor | None) -> int | None:
    """The model's output width: from ``example_input`` when given, else the last ``nn.Linear``'s out_features."""
    if example_input is not None:
        with _eval_restored(model):
            out = model(example_input[:1])
        return int(out.shape[-1]) if isinstance(out, torch.Tensor) and out.dim() == 2 else None
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return int(linears[-1].out_features) if linears else None


def _check_rule_classes(model: nn.Module, rule: Any, example_input: torch.Tensor | None) -> None:
    width = _output_width(model, example_input)
    classes = getattr(rule, "classes", None)
    top = max(int(c) for c in classes) if classes else int(rule.num_classes) - 1
    if width is not None and top >= width:
        raise MocoError(f"the rule assigns class {top}, but the model has only {width} outputs (classes 0..{width - 1}); "
                        "fit the rule on this model's predictions")


@contextlib.contextmanager
def _eval_restored(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad inside; every module's ``training`` flag restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, flag in flags:
            module.training = flag


# ---------------------------------------------------------------------------- the network


class BranchedNetwork(nn.Module):
    """A classifier with a rule-based early exit after ``layer``: ``forward(x) -> (predictions, mask)``.

    The head (``model`` up to ``layer``, see :func:`moco.split.split_at`) runs on the whole batch.
    Its output, flattened to ``[B, D]``, goes to ``rule.assign``; samples where the rule fires exit
    with the rule's class, and only the others run the tail: ``tail(h.index_select(0, idx))`` with
    ``idx`` the indices of the non-exited samples, scattered back with ``index_copy_``. Exited
    samples cost no tail compute; when every sample exits the tail is not called at all.

    Args:
        model: the classifier; never modified. Head and tail share its submodules and parameters
            (no copies), so the network follows later changes to the model's weights.
        layer: split point as in :func:`moco.split.split_at`: an int index into an ``nn.Sequential``
            (seed 000: ``2``, after conv1 + ReLU, 32x26x26) or a qualified module name
            (``"layer1"``). Default: ``rule.layer`` when the rule records it, else ``2``.
        rule: the fitted rule (:class:`moco.rules.rule.LinearRule`, a ``RuleSet`` or anything with
            the same duck-typed interface, see the module docstring). Stored as a plain attribute,
            not a submodule: ``net.to(device)`` moves head and tail, not the rule.
        output: ``"onehot"`` (default): predictions are ``[B, num_classes]`` in the model's output
            dtype; non-exited rows are exactly the model's outputs (e.g. logits), exited rows a
            one-hot row of the rule's class (1 at the class, 0 elsewhere), so ``argmax`` gives the
            class for every row. The one-hot rows are not scores: do not softmax them as logits.
            ``"classes"``: predictions are int64 class indices ``[B]`` (the rule's class for exited
            samples, the argmax of the model's output for the others).
        pooling: how the head output becomes the rule's features, as in :func:`moco.capture.capture`:
            None or ``"flatten"`` (default, ``[B, C*H*W]``), ``"max"`` / ``"avg"`` (spatial pooling,
            ``[B, C]``: a rule fitted on ``SpatialPool`` features) or a processor instance.
        example_input: optional batch; when given, the model's output width is measured on it (else
            it is taken from the model's last ``nn.Linear``) to refuse a rule whose classes exceed it.

    Eval only: the network is meant for inference. ``net.eval()`` / ``net.train()`` switch the
    model's own submodules (shared with head and tail); the wrapper adds no state of its own, and
    ``forward`` is pure (no counters; count tail work with a forward pre-hook on ``net.tail``).

    Attributes:
        head, tail: the two halves (submodules). rule: the rule. layer: the split layer as given.
        point: qualified name of the last module of the head (``"1"`` for Sequential index 2).
        output: the output mode.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``layer`` neither int nor str, or ``rule``
            lacks ``assign`` / ``num_classes`` / ``n_features``.
        MocoError: the model cannot be split at ``layer``; ``rule.layer`` names a different layer;
            an unknown ``output`` or ``pooling``; a rule class beyond the model's outputs. At forward:
            NaN/inf input or one the head rejects (TypeError for a non-float input). At the first forward: the head output has a different number of
            features than ``rule.n_features``, or the model output width differs from
            ``rule.num_classes``.
    """

    def __init__(self, model: nn.Module, layer: int | str | None = None, rule: Any = None, *, output: str = "onehot",
                 pooling: Any = None, example_input: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        _check_rule(rule)
        processor = _pooling(pooling)
        if output not in OUTPUTS:
            raise MocoError(f"output must be one of {', '.join(repr(o) for o in OUTPUTS)}, got {output!r}")
        rule_layer = getattr(rule, "layer", None)
        if layer is None:
            layer = rule_layer if rule_layer is not None else 2
        _check_layer_type(layer)
        split = split_at(model, layer)
        if rule_layer is not None and not _same_layer(rule_layer, layer, split):
            raise MocoError(
                f"the rule was fitted at layer {_layer_label(rule_layer)} but the network splits at layer "
                f"{_layer_label(layer)}; split at {_layer_label(rule_layer)} or fit the rule on layer "
                f"{_layer_label(layer)}'s output"
            )
        self.head = split.head
        self.tail = split.tail
        self.rule = rule
        self.layer = layer
        self.point = split.point
        self.output = output
        self.pooling = processor
        self.training = model.training
        _check_rule_classes(model, rule, example_input)

    def extra_repr(self) -> str:
        pooling = "" if self.pooling is None else f", pooling={self.pooling!r}"
        return f"layer={_layer_label(self.layer)}, rule={type(self.rule).__name__}, output={self.output!r}{pooling}"

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        """The rule's input: the head output, pooled (``pooling``) and flattened to float32 ``[B, D]``."""
        if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1:
            got = f"shape {tuple(hidden.shape)}" if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise MocoError(f"the head up to layer {_layer_label(self.layer)} must return a [B, ...] tensor, got {got}")
        pooled = hidden if self.pooling is None else self.pooling(hidden)
        features = pooled.reshape(pooled.shape[0], math.prod(pooled.shape[1:]))
        n_features = int(self.rule.n_features)
        if features.shape[1] != n_features:
            how = "" if self.pooling is None else f" after {self.pooling!r}"
            raise MocoError(
                f"rule expects {n_features} features but layer {_layer_label(self.layer)} gives {features.shape[1]}"
                f"{how} (shape {tuple(hidden.shape[1:])} per sample); fit the rule on this layer's output"
                + ("" if self.pooling is not None else " (or pass the pooling it was captured with)")
            )
        return features if features.dtype == torch.float32 else features.float()

    def decide(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rule's ``(mask [B] bool, classes [B] int64)`` for a head output ``hidden``."""
        return _assign(self.rule, self.features(hidden))

    def decision_margin(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Per sample, the smallest relative distance ``|score - t| / (1 + |t|)`` of a rule score to its
        threshold (how far the decision is from flipping), or None for a rule without ``scores`` and
        ``thresholds`` (a duck-typed rule)."""
        scores = getattr(self.rule, "scores", None)
        thresholds = getattr(self.rule, "thresholds", None)
        classes = getattr(self.rule, "classes", None)
        if not callable(scores) or not isinstance(thresholds, dict) or classes is None:
            return None
        s = scores(self.features(hidden)).double()
        t = torch.tensor([float(thresholds.get(c, math.inf)) for c in classes], dtype=torch.float64)
        finite = torch.isfinite(t)
        if not bool(finite.any()):
            return torch.full((s.shape[0],), math.inf, dtype=torch.float64)
        rel = (s[:, finite] - t[finite]).abs() / (1.0 + t[finite].abs())
        return rel.min(dim=1).values

    def _fallback_dtype(self, hidden: torch.Tensor) -> torch.dtype:
        """The output dtype when the tail does not run: its first floating parameter's, else the head output's."""
        for tensor in (*self.tail.parameters(), *self.tail.buffers()):
            if tensor.is_floating_point():
                return tensor.dtype
        return hidden.dtype if hidden.is_floating_point() else torch.get_default_dtype()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions for ``x`` ``[B, ...]`` and the early-exit mask.

        Returns:
            ``(predictions, mask)``: predictions ``[B, num_classes]`` in the model's output dtype
            (``output="onehot"``) or int64 ``[B]`` (``output="classes"``); ``mask`` the rule's bool
            mask ``[B]``, True where the sample exited after the head. ``B = 0`` gives empty results.
        """
        x = _check_input(x)
        try:
            hidden = self.head(x)
        except (RuntimeError, TypeError) as exc:
            raise MocoError(f"the model's layers up to {_layer_label(self.layer)} reject an input of shape "
                            f"{tuple(x.shape)} and dtype {x.dtype}: {_last_line(exc)}; pass the batch the model "
                            "was trained on") from None
        mask, classes = self.decide(hidden)
        b = hidden.shape[0]
        mask = mask.to(hidden.device)
        classes = classes.to(hidden.device)
        num_classes = int(self.rule.num_classes)

        exit_idx = mask.nonzero().squeeze(1)
        keep_idx = (~mask).nonzero().squeeze(1)
        exit_classes = classes.index_select(0, exit_idx)
        if exit_classes.numel() and (int(exit_classes.min()) < 0 or int(exit_classes.max()) >= num_classes):
            raise MocoError(
                f"the rule assigned class {int(exit_classes.min())}..{int(exit_classes.max())}, outside "
                f"0..{num_classes - 1} (rule.num_classes = {num_classes})"
            )

        rest = None
        if keep_idx.numel():
            # nobody exited: the whole batch continues as it is (no gather copy)
            rest = self.tail(hidden if keep_idx.numel() == b else hidden.index_select(0, keep_idx))
            if not isinstance(rest, torch.Tensor) or rest.dim() != 2 or rest.shape[1] < num_classes:
                got = f"shape {tuple(rest.shape)}" if isinstance(rest, torch.Tensor) else type(rest).__name__
                raise MocoError(
                    f"the model's output must be [B, {num_classes}] to match rule.num_classes = {num_classes}, "
                    f"got {got}; fit the rule on this model's predictions"
                )

        if self.output == "classes":
            predictions = torch.empty(b, dtype=torch.long, device=hidden.device)
            predictions.index_copy_(0, exit_idx, exit_classes)
            if rest is not None:
                predictions.index_copy_(0, keep_idx, rest.argmax(dim=1))
            return predictions, mask

        dtype = rest.dtype if rest is not None else self._fallback_dtype(hidden)
        width = rest.shape[1] if rest is not None else num_classes  # rules may cover fewer classes than the model has
        predictions = torch.zeros(b, width, dtype=dtype, device=hidden.device)
        if exit_idx.numel():
            predictions.index_put_((exit_idx, exit_classes), torch.ones((), dtype=dtype, device=hidden.device))
        if rest is not None:
            predictions.index_copy_(0, keep_idx, rest)
        return predictions, mask


# ---------------------------------------------------------------------------- cost model


@dataclass(frozen=True)
class CostEstimate:
    """Predicted cost of a :class:`BranchedNetwork`, in **MACs per sample**.

    ``full_macs`` the unsplit model (``head_macs + tail_macs``: the split runs the same ops),
    ``head_macs`` the layers up to the split, ``rule_macs`` the rule (``D * num_classes``),
    ``tail_macs`` the rest, ``expected_macs = head_macs + rule_macs + (1 - coverage) * tail_macs``
    and ``ratio = expected_macs / full_macs`` (below 1 saves work; at coverage 0 it is above 1 by
    the rule's overhead). ``features`` is ``D``, ``num_classes`` the output width.
    """

    layer: int | str
    coverage: float
    features: int
    num_classes: int
    full_macs: int
    head_macs: int
    rule_macs: int
    tail_macs: int
    expected_macs: float
    ratio: float

    @property
    def macs_saved_fraction(self) -> float:
        """``1 - ratio``: the fraction of the model's MACs per sample the early exit saves (negative: costs)."""
        return 1.0 - self.ratio


@dataclass(frozen=True)
class _SplitCost:
    head_macs: int
    tail_macs: int
    features: int
    num_classes: int


def _per_sample(total: int, batch: int) -> int:
    return int(round(total / batch))


def _split_cost(model: nn.Module, split: ModelSplit, example: torch.Tensor) -> _SplitCost:
    """Head and tail MACs per sample, ``D`` and the output width, profiling each half on ``example``.

    Profiling the halves separately attributes every op exactly (the split runs the model's ops),
    for Sequential and fx-traced splits alike.
    """
    from moco.profile import profile

    if not isinstance(example, torch.Tensor):
        raise TypeError(f"example_input must be a tensor [N, ...], not {type(example).__name__}")
    if example.dim() < 1 or example.shape[0] < 1:
        raise MocoError(f"example_input needs at least one sample, got shape {tuple(example.shape)}")
    n = example.shape[0]
    head_profile = profile(split.head, example, latency=False)
    with _eval_restored(model):
        hidden = split.head(example)
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1:
        raise MocoError(f"the head up to {split.point!r} must return a [N, ...] tensor")
    tail_profile = profile(split.tail, hidden, latency=False)
    out_shape = tail_profile.totals.output_shape
    if not out_shape or not isinstance(out_shape[0], int) or len(out_shape) != 2:
        raise MocoError(f"the model must return [N, classes] outputs, got shape {out_shape}")
    return _SplitCost(
        head_macs=_per_sample(head_profile.totals.macs, n),
        tail_macs=_per_sample(tail_profile.totals.macs, n),
        features=math.prod(hidden.shape[1:]),
        num_classes=int(out_shape[1]),
    )


def _check_coverage(coverage: Any) -> float:
    if isinstance(coverage, bool) or not isinstance(coverage, (int, float, np.floating)):
        raise TypeError(f"coverage must be a number in [0, 1], not {type(coverage).__name__}")
    coverage = float(coverage)
    if not 0.0 <= coverage <= 1.0:
        raise MocoError(f"coverage is the fraction of samples that exit early; it must be in [0, 1], got {coverage}")
    return coverage


def _estimate(layer: int | str, coverage: float, cost: _SplitCost, features: int, num_classes: int) -> CostEstimate:
    full = cost.head_macs + cost.tail_macs
    rule_macs = features * num_classes
    expected = cost.head_macs + rule_macs + (1.0 - coverage) * cost.tail_macs
    return CostEstimate(
        layer=layer, coverage=coverage, features=features, num_classes=num_classes, full_macs=full,
        head_macs=cost.head_macs, rule_macs=rule_macs, tail_macs=cost.tail_macs, expected_macs=expected,
        ratio=expected / full if full else math.inf,
    )


def expected_macs(
    model: nn.Module,
    layer: int | str,
    coverage: float,
    *,
    example_input: torch.Tensor,
    n_features: int | None = None,
    num_classes: int | None = None,
) -> CostEstimate:
    """Expected **MACs per sample** of a :class:`BranchedNetwork` on ``model`` split at ``layer``.

    ``expected = head_macs + rule_macs + (1 - coverage) * tail_macs`` with ``rule_macs = D *
    num_classes`` (one matrix product). Head and tail MACs come from
    :func:`moco.profile.profile` (``latency=False``) of each half on ``example_input`` (use a
    batch of 1, e.g. ``torch.zeros(1, 1, 28, 28)``; larger batches are divided by their size).

    Args:
        model: the classifier; never modified.
        layer: split point as in :func:`moco.split.split_at`.
        coverage: fraction of samples that exit early, in ``[0, 1]``.
        example_input: one input batch ``[N, ...]`` with ``N >= 1``.
        n_features: ``D`` of the rule; default the head output size per sample.
        num_classes: classes of the rule; default the model output width.

    Returns:
        :class:`CostEstimate`; ``ratio`` is expected / full MACs.

    Raises:
        MocoError: the model cannot be split at ``layer``, coverage outside ``[0, 1]``, an empty or
            unusable example input. TypeError: wrong argument types.
    """
    _check_layer_type(layer)
    coverage = _check_coverage(coverage)
    split = split_at(model, layer)
    cost = _split_cost(model, split, example_input)
    features = cost.features if n_features is None else int(n_features)
    classes = cost.num_classes if num_classes is None else int(num_classes)
    if features < 1 or classes < 1:
        raise MocoError(f"n_features and num_classes must be positive, got {features} and {classes}")
    return _estimate(layer, coverage, cost, features, classes)


# ---------------------------------------------------------------------------- choosing the layer


@dataclass(frozen=True)
class LayerCandidate:
    """One candidate split layer of :func:`suggest_layer` (MACs are **per sample**).

    ``layer`` the split point, ``features`` ``D`` (head output size per sample), ``coverage`` the
    fraction of held-out samples the fitted rule lets exit, ``agreement`` the fraction of those
    exits whose class equals the model's prediction (None when nothing exited), ``head_macs`` /
    ``rule_macs`` / ``tail_macs`` the cost parts, ``expected_macs = head + rule + (1 - coverage) *
    tail``, ``macs_saved_fraction = 1 - expected_macs / full_macs`` and ``note`` why no rule was
    fitted (the fit's MocoError), else ``""``.
    """

    layer: int | str
    features: int
    coverage: float
    agreement: float | None
    head_macs: int
    rule_macs: int
    tail_macs: int
    expected_macs: float
    macs_saved_fraction: float
    note: str = ""


@dataclass(frozen=True)
class LayerSuggestion:
    """Result of :func:`suggest_layer`: the chosen layer and the table of every candidate.

    ``best`` the :class:`LayerCandidate` with the largest ``macs_saved_fraction`` (ties: the
    earliest); ``table`` all candidates in the order tried (execution order by default); ``rule``
    the rule fitted at ``best.layer`` (on the fitting part of the sample), ready for
    ``BranchedNetwork(model, best.layer, rule)``; ``bottleneck`` the module with the most MACs;
    ``full_macs`` the model's MACs per sample; ``n_fit`` / ``n_holdout`` the samples used to fit
    rules and to measure coverage.
    """

    best: LayerCandidate
    table: tuple[LayerCandidate, ...]
    rule: Any = field(default=None, repr=False, compare=False)
    bottleneck: str | None = None
    full_macs: int = 0
    n_fit: int = 0
    n_holdout: int = 0

    def to_dataframe(self):
        """A pandas DataFrame, one row per candidate (columns as :class:`LayerCandidate`, plus ``best``)."""
        import pandas as pd

        records = []
        for row in self.table:
            record = {name: getattr(row, name) for name in LayerCandidate.__dataclass_fields__}
            record["best"] = row is self.best
            records.append(record)
        columns = [*LayerCandidate.__dataclass_fields__, "best"]
        return pd.DataFrame.from_records(records, columns=columns)

    def to_frame(self):
        """The candidates table (:meth:`to_dataframe`), the result protocol's name."""
        return self.to_dataframe()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: the best layer, every candidate's row, the bottleneck, MACs and sample counts (the rule
        itself is saved with ``rule.save(path)``)."""
        from moco.results import json_safe

        rows = [{name: getattr(row, name) for name in LayerCandidate.__dataclass_fields__} for row in self.table]
        return json_safe({"best": self.best.layer, "table": rows, "bottleneck": self.bottleneck,
                          "full_macs": self.full_macs, "n_fit": self.n_fit, "n_holdout": self.n_holdout})

    def to_text(self) -> str:
        """A readable table (MACs per sample in human units) with the best candidate marked ``*``."""
        from moco.profile.report import human_count, human_share

        header = ["", "layer", "features", "coverage", "agreement", "head MACs", "rule MACs", "tail MACs",
                  "expected MACs", "saved"]
        body = []
        for row in self.table:
            body.append([
                "*" if row is self.best else "", _layer_label(row.layer), str(row.features),
                human_share(row.coverage), human_share(row.agreement), human_count(row.head_macs),
                human_count(row.rule_macs), human_count(row.tail_macs), human_count(row.expected_macs),
                human_share(row.macs_saved_fraction),
            ])
        widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

        def fmt(line: list[str]) -> str:
            return "  ".join(
                text.ljust(w) if i < 2 else text.rjust(w) for i, (text, w) in enumerate(zip(line, widths))
            ).rstrip()

        rule = "-" * len(fmt(header))
        lines = [
            f"Early-exit layer candidates (MACs per sample; full model {human_count(self.full_macs)}, "
            f"bottleneck {self.bottleneck!r}; rules fitted on {self.n_fit} samples, coverage on {self.n_holdout})",
            fmt(header), rule, *(fmt(line) for line in body), rule,
            f"best: layer {_layer_label(self.best.layer)} saves {human_share(self.best.macs_saved_fraction)} "
            f"of the MACs at coverage {human_share(self.best.coverage)}",
        ]
        lines += [f"layer {_layer_label(row.layer)}: {row.note}" for row in self.table if row.note]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()


def _fit_with_engine(
    features: np.ndarray, predictions: np.ndarray, *, layer: int | str, max_error: float, confidence: float
) -> Any:
    """Default ``fit``: the :class:`moco.rules.engine.AnalyticsEngine` linear sufficient rules for the predictions."""
    from moco.rules.engine import AnalyticsEngine
    from moco.rules.report import UncertifiedRuleWarning

    engine = AnalyticsEngine(features.reshape(len(features), -1), {"predictions": predictions}, layer=layer,
                             progress=False)
    with warnings.catch_warnings():  # a candidate that certifies nothing shows in the table, not as a warning each
        warnings.simplefilter("ignore", UncertifiedRuleWarning)
        result = engine.compute_linear_sufficient_rules("predictions", max_error=max_error, confidence=confidence)
    return result[0] if isinstance(result, tuple) else result  # (RuleSet, report)


def _sample(data: Any, sample_size: int, batch_size: int, seed: int) -> torch.Tensor:
    """Up to ``sample_size`` inputs of ``data``, shuffled with ``seed`` (a DataLoader keeps its own order)."""
    generator = torch.Generator().manual_seed(seed)
    parts: list[torch.Tensor] = []
    count = 0
    for x, _ in iter_batches(data, batch_size, shuffle=True, generator=generator):
        if not isinstance(x, torch.Tensor):
            raise MocoError(f"a batch of inputs is a {type(x).__name__}, not a tensor")
        take = x[: sample_size - count]
        parts.append(take)
        count += len(take)
        if count >= sample_size:
            break
    if count < 2:
        raise MocoError(f"suggest_layer needs at least 2 samples (some to fit rules, some to measure coverage), got {count}")
    return torch.cat(parts, dim=0)


def _heaviest(prof, tolerance: float = 0.01) -> list[str]:
    """The modules with the most MACs, all of them when several tie (within ``tolerance`` of the maximum):
    the convs of a constant-width residual stage cost the same, and the first of them is not *the*
    bottleneck that an exit has to skip."""
    top = max((r.macs or 0 for r in prof.rows if r.name), default=0)
    if top <= 0:
        return [prof.bottleneck] if prof.bottleneck else []
    return [r.name for r in prof.rows if r.name and (r.macs or 0) >= (1 - tolerance) * top]


def _default_candidates(model: nn.Module, heaviest: list[str]) -> list[int | str]:
    """Split points in execution order whose tail still holds one of the ``heaviest`` modules (the
    bottleneck, or all the modules that tie with it)."""
    if _is_plain_sequential(model):
        points: list[int | str] = list(range(1, len(model)))
    else:
        points = list(split_boundaries(model))
        if not points:
            raise MocoError(
                f"{type(model).__name__} has no split points (torch.fx cannot trace it); build it as an "
                f"nn.Sequential or pass candidates="
            )
    modules = dict(model.named_modules())
    targets = [modules[n] for n in heaviest if n in modules and modules[n] is not model]
    if not targets:
        return points
    before: list[int | str] = []
    for point in points:
        head = {id(module) for module in split_at(model, point).head.modules()}
        if all(id(t) in head for t in targets):
            break
        before.append(point)
    if not before:
        names = ", ".join(repr(n) for n in heaviest)
        raise MocoError(
            f"the bottleneck ({names}) runs before every split point, so no early exit can skip it; "
            f"pass candidates= to try layers after it"
        )
    return before


def _check_fraction(name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    if not low < float(value) < high:
        raise MocoError(f"{name} must be in ({low}, {high}), got {value}")
    return float(value)


def suggest_layer(
    model: nn.Module,
    data: Any,
    *,
    candidates: list[int | str] | tuple[int | str, ...] | None = None,
    fit: Callable[[np.ndarray, np.ndarray], Any] | None = None,
    max_error: float = 0.01,
    confidence: float = 0.95,
    sample_size: int = 5000,
    holdout: float = 0.25,
    batch_size: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> LayerSuggestion:
    """Choose the early-exit layer: the candidate before the bottleneck whose rules save the most MACs.

    The bottleneck is the module with the most MACs (:func:`moco.profile.profile` on one sample).
    For every candidate layer the model runs once on a sample of ``data``
    (:func:`moco.capture.build_embeddings_and_predictions`); a rule is fitted on the first
    ``1 - holdout`` of the sample and its coverage (fraction of samples where ``rule.assign``
    fires) measured on the rest. Each candidate's cost is
    ``head_macs + D * num_classes + (1 - coverage) * tail_macs`` **MACs per sample**.

    Args:
        model: the classifier; never modified (run in eval mode, flags restored).
        data: a tensor ``[N, ...]``, an ``(x, y)`` pair, a Dataset or a DataLoader (labels unused).
        candidates: split points to try, in order (ints for an ``nn.Sequential``, module names).
            Default: every split point before the bottleneck in execution order (where several
            modules tie for the most MACs, within 1%, before the last of them): Sequential split
            indices ``1 .. k`` where ``model[k]`` holds the bottleneck, or the names of
            :func:`moco.split.split_boundaries` (a leaf listed right before its parent, the same
            boundary, is tried once under the parent's name).
        fit: ``fit(features, predictions) -> rule`` with ``features`` float32 numpy ``[n, D]`` (the
            layer's output flattened) and ``predictions`` int64 numpy ``[n]``, the model's predicted
            class per sample (argmax of its output); the returned rule must have the interface in
            the module docstring. A :class:`MocoError` from ``fit`` marks that candidate as
            covering nothing (the message goes to ``note``). Default: the ``RuleSet`` of
            :meth:`moco.rules.engine.AnalyticsEngine.compute_linear_sufficient_rules` with
            ``max_error`` and ``confidence``, recording the candidate as ``rule.layer`` (the engine
            holds out part of the fitting samples itself to certify the rules' error).
        max_error, confidence: passed to the default ``fit`` (ignored with a custom one).
        sample_size: samples used in total (at most; fewer when ``data`` is smaller). Features are
            held in memory: ``sample_size * D * 4`` bytes per candidate at a time.
        holdout: fraction of the sample used to measure coverage, in ``(0, 1)``.
        batch_size: samples per forward pass.
        seed: seeds the shuffle that picks the sample (a DataLoader keeps its own order).
        progress: show a tqdm bar over the candidates.

    Returns:
        :class:`LayerSuggestion`: ``best`` (largest saving among the candidates whose rule fires on
        some held-out sample, ties to the earliest), the whole
        ``table`` and the fitted ``rule`` at ``best.layer``. ``best.macs_saved_fraction`` may be
        negative when no candidate covers enough samples to pay for its rule.

    Raises:
        MocoError: no candidate's rule fires on any held-out sample; the bottleneck comes before
            every split point; a candidate that cannot be split; a rule whose ``n_features`` or
            ``num_classes`` does not fit the layer or model; too few samples.
    """
    from moco.profile import profile

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    if isinstance(sample_size, bool) or not isinstance(sample_size, int) or sample_size < 2:
        raise MocoError(f"sample_size must be an int >= 2, got {sample_size!r}")
    holdout = _check_fraction("holdout", holdout, 0.0, 1.0)
    if fit is None:
        max_error = _check_fraction("max_error", max_error, 0.0, 1.0)
        confidence = _check_fraction("confidence", confidence, 0.0, 1.0)
    elif not callable(fit):
        raise TypeError(f"fit must be callable fit(features, predictions) -> rule, not {type(fit).__name__}")

    x = _sample(data, sample_size, batch_size, seed)
    n = len(x)
    n_holdout = min(n - 1, max(1, int(round(n * holdout))))
    n_fit = n - n_holdout
    example = x[:1]
    full_profile = profile(model, example, latency=False)
    bottleneck = full_profile.bottleneck
    full_macs = full_profile.totals.macs

    if candidates is None:
        layers = _default_candidates(model, _heaviest(full_profile))
    else:
        layers = list(candidates)
        if not layers:
            raise MocoError("candidates is empty; name at least one split point (or pass None for the default)")
        for layer in layers:
            _check_layer_type(layer)

    table: list[LayerCandidate] = []
    rules: list[Any] = []
    for layer in tqdm(layers, desc="suggest_layer", unit="layer", disable=not show_progress(progress), leave=False):
        split = split_at(model, layer)
        cost = _split_cost(model, split, example)
        embeddings, outputs = build_embeddings_and_predictions(
            model, x, layer, batch_size=batch_size, progress=False
        )
        features = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32).reshape(n, -1))
        predicted = np.asarray(outputs).argmax(axis=1).astype(np.int64)
        del embeddings, outputs
        coverage, agreement, note, rule = 0.0, None, "", None
        fit_layer = fit or functools.partial(
            _fit_with_engine, layer=layer, max_error=max_error, confidence=confidence
        )
        try:
            rule = fit_layer(features[:n_fit], predicted[:n_fit])
        except MocoError as err:
            note = f"no rule: {err}"
        if rule is not None:
            _check_rule(rule)
            d, classes = _rule_int(rule, "n_features"), _rule_int(rule, "num_classes")
            if d != cost.features or classes != cost.num_classes:
                raise MocoError(
                    f"fit returned a rule for {d} features and {classes} classes, but layer "
                    f"{_layer_label(layer)} gives {cost.features} features and the model {cost.num_classes} classes"
                )
            held = torch.from_numpy(features[n_fit:])
            mask, assigned = _assign(rule, held)
            coverage = float(mask.float().mean())
            if bool(mask.any()):
                truth = torch.from_numpy(predicted[n_fit:])
                agreement = float((assigned[mask] == truth[mask]).float().mean())
        del features
        estimate = _estimate(layer, coverage, cost, cost.features, cost.num_classes)
        table.append(LayerCandidate(
            layer=layer, features=cost.features, coverage=coverage, agreement=agreement,
            head_macs=estimate.head_macs, rule_macs=estimate.rule_macs, tail_macs=estimate.tail_macs,
            expected_macs=estimate.expected_macs, macs_saved_fraction=estimate.macs_saved_fraction, note=note,
        ))
        rules.append(rule)

    if not any(row.coverage > 0 for row in table):
        tried = ", ".join(_layer_label(row.layer) for row in table)
        by_note: dict[str, list[str]] = {}  # one reason once, with the layers it holds for (it is often the data size)
        for row in table:
            if row.note:
                by_note.setdefault(row.note, []).append(_layer_label(row.layer))
        notes = "; ".join(note if len(layers) == len(table) else f"{', '.join(layers)}: {note}"
                          for note, layers in by_note.items())
        raise MocoError(
            f"no rule fires on any of the {n_holdout} held-out samples at layers {tried}"
            + (f" ({notes})" if notes else "")
            + "; allow a larger max_error, use more data or try other candidates"
        )
    firing = [i for i, row in enumerate(table) if row.coverage > 0]
    best_index = max(firing, key=lambda i: (table[i].macs_saved_fraction, -i))
    return LayerSuggestion(
        best=table[best_index], table=tuple(table), rule=rules[best_index], bottleneck=bottleneck,
        full_macs=_per_sample(full_macs, len(example)), n_fit=n_fit, n_holdout=n_holdout,
    )
