"""Magnitude pruning (seed 003): L1-norm unit importance, one-shot selection and the iterative
prune-retrain loop, producing the ``keep`` dict that :func:`moco.compress.surgery.apply` turns into a
physically smaller dense model.

* :func:`l1_importance` -- Li et al. 2017, "Pruning Filters for Efficient ConvNets": the importance of
  an output unit is the sum of the absolute values of its weights (a ``Conv2d`` filter
  ``W[c]`` of shape ``(Cin/groups, kH, kW)``, a ``Linear`` row ``W[j]``); the bias is not counted.
* :func:`group_importance` -- Torch-Pruning's *group* importance: a unit's score summed over every layer
  of its dependency group (the producing convs/linears' filters, the input-channel slices of the layers
  that consume it and the BatchNorm scales), by L1 or L2 magnitude, or Network Slimming's BatchNorm
  scale ``|gamma|`` alone.
* :func:`select_one_shot` -- remove a fraction of the units at once, per layer or globally, by any of
  those criteria (``importance="l1"`` (producers only, the default), ``"group_l1"``, ``"group_l2"``,
  ``"bn_scale"``).
* :func:`compare_importance` -- the same MAC budget and fine-tuning for several criteria, to measure
  which keeps more accuracy on a given model.
* :class:`IterativePruner` -- seed 003's Step-3 loop, batched so it runs in minutes: remove the least
  important units of one layer, retrain briefly with the removed units held at zero, log accuracy
  before the prune, after it and after retraining, and stop (rolling the step back) when the
  accuracy drop against the unpruned model exceeds a threshold.
* :func:`masked_copy` -- seed 003's emulation of pruning: a copy of the model with the pruned units'
  weights zeroed (same size, same speed); :func:`masked_equivalent` builds that zero-masked twin of a
  smaller model made by surgery, so both can be timed side by side.

Pruning never modifies the caller's model: every function works on a ``copy.deepcopy``.

Units: accuracies are fractions in [0, 1]; ``drop_threshold`` is a fraction of accuracy (0.01 = one
percentage point); logged drops (``drop_points``) are in percentage points.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from moco.batches import as_tensors
from moco.errors import MocoError
from moco.progress import show_progress

__all__ = [
    "IMPORTANCE_CRITERIA", "ImportanceComparison", "ImportanceRow", "IterativePruner", "PRUNABLE_TYPES", "PruneStep",
    "compare_importance", "group_importance", "l1_importance", "masked_copy", "masked_equivalent", "select_one_shot",
]

PRUNABLE_TYPES = (nn.Conv2d, nn.Linear)


# ------------------------------------------------------------------------------------------ helpers


def _check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def _prunable_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES) and name]


def _layer(model: nn.Module, name: Any) -> nn.Module:
    """The Conv2d / Linear module called ``name`` (MocoError naming the prunable layers otherwise)."""
    if not isinstance(name, str):
        raise TypeError(f"layer names are strings as in model.named_modules() (e.g. '0' or 'layer1.0.conv1'), "
                        f"got {type(name).__name__} {name!r}")
    modules = dict(model.named_modules())
    if name not in modules or not name:
        raise MocoError(f"unknown layer {name!r}; prunable layers (Conv2d/Linear) are: "
                        f"{', '.join(repr(n) for n in _prunable_names(model)) or 'none'}")
    module = modules[name]
    if not isinstance(module, PRUNABLE_TYPES):
        raise MocoError(f"layer {name!r} is a {type(module).__name__}; only Conv2d (output channels) and Linear "
                        f"(output features) can be pruned: {', '.join(repr(n) for n in _prunable_names(model))}")
    return module


def _layer_list(model: nn.Module, layers: Iterable[str] | str | None, *, allow_none: bool = True) -> list[str]:
    if layers is None:
        if not allow_none:
            raise MocoError("layers is required: name the Conv2d/Linear layers to prune, e.g. layers=['0', '2', '5']")
        return _prunable_names(model)
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise MocoError("layers is empty; name at least one Conv2d/Linear layer to prune")
    if len(set(names)) != len(names):
        raise MocoError(f"layers lists a layer twice: {names}")
    for name in names:
        _layer(model, name)
    return names


def _units(module: nn.Module) -> int:
    return int(module.weight.shape[0])


def check_counts(owner: Any, keys: Sequence[str], optional: Sequence[str] = ()) -> None:
    """MocoError unless every attribute ``keys`` of ``owner`` is an int >= 1 (``optional`` ones may be None: all)."""
    for key in (*keys, *optional):
        v = getattr(owner, key)
        if v is None and key in optional:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            extra = "None (all) or " if key in optional else ""
            raise MocoError(f"{key} must be {extra}an int >= 1, got {v!r}")


def _as_fraction(value: Any, what: str, *, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MocoError(f"{what} must be a number, got {value!r}")
    return float(value)


# ------------------------------------------------------------------------------------------ importance


@torch.no_grad()
def l1_importance(model: nn.Module, layers: Iterable[str] | str | None = None) -> dict[str, np.ndarray]:
    """L1-norm importance of every output unit of the named layers (Li et al. 2017).

    ``layers``: qualified names (as in ``model.named_modules()``) of ``Conv2d`` / ``Linear`` layers;
    default: every one of them. Returns name -> float64 array of length ``out_channels`` /
    ``out_features``: the sum of ``|w|`` over a filter (Conv2d, over input channels and kernel) or
    over a row (Linear), bias excluded. Larger is more important. The model is not modified.
    """
    _check_model(model)
    names = _layer_list(model, layers)
    out = {}
    for name in names:
        w = _layer(model, name).weight.detach()
        out[name] = w.abs().reshape(w.shape[0], -1).sum(dim=1).double().cpu().numpy()
    return out


IMPORTANCE_CRITERIA = ("l1", "group_l1", "group_l2", "bn_scale")
"""Criteria :func:`select_one_shot` accepts: producers' L1 (Li et al.), group L1 / L2 (Torch-Pruning), BN scale."""


@torch.no_grad()
def group_importance(model: nn.Module, example_input: Any, criterion: str = "group_l1") -> dict[str, np.ndarray]:
    """Importance of every unit of every prunable dependency group, summed over the whole group.

    The model is traced (:func:`moco.compress.surgery.dependency_groups`); for each group (keyed by its
    first layer, ``ChannelGroup.layers[0]``, whose unit ``i`` is the group's unit ``i``) every tensor
    slice that belongs to a unit contributes: the filter / row of each producing ``Conv2d`` /
    ``Linear``, the input-channel slice ``W[:, j]`` of each consuming ungrouped conv or linear (a
    ``Linear`` after ``flatten`` contributes the ``H*W`` columns of the channel), and ``|gamma|`` of
    each BatchNorm on those channels. ``criterion``:

    * ``"group_l1"``: sum of ``|w|`` per slice; ``"group_l2"``: sum of ``w**2`` per slice;
    * ``"bn_scale"``: ``|gamma|`` of the group's BatchNorms only (Network Slimming, Liu et al. 2017);
      a group without BatchNorm falls back to ``"group_l1"``.

    Each layer's contribution is divided by its mean over the group's units before the layers are
    summed (layers of different fan-in are comparable; Torch-Pruning's "mean" normalisation), so the
    scores are dimensionless, larger is more important. Returns ``{leader: float64 [units]}``; the model
    is not modified.
    """
    from moco.compress.surgery.analysis import analyse, groups_of

    _check_model(model)
    if criterion not in ("group_l1", "group_l2", "bn_scale"):
        raise MocoError(f"criterion must be 'group_l1', 'group_l2' or 'bn_scale', got {criterion!r}")
    analysis = analyse(copy.deepcopy(model), example_input)
    modules = dict(analysis.model.named_modules())
    power = 2 if criterion == "group_l2" else 1
    # per layer: {root: summed magnitude} of the slices belonging to each unit class
    per_layer: dict[tuple[str, str], dict[int, float]] = {}

    def add(key: tuple[str, str], roots: np.ndarray, values: np.ndarray) -> None:
        acc = per_layer.setdefault(key, {})
        for r, v in zip(roots.tolist(), values.tolist()):
            acc[r] = acc.get(r, 0.0) + v

    for name, producer in analysis.producers.items():
        w = modules[name].weight.detach().double()
        add(("out", name), analysis.units.roots(producer.ids), w.abs().pow(power).reshape(w.shape[0], -1).sum(1).numpy())
    for call in analysis.calls:
        module = modules[call.module]
        roots = analysis.units.roots(call.in_slots)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.weight is not None:
                add(("bn", call.module), roots, module.weight.detach().double().abs().pow(power).numpy())
        elif isinstance(module, (nn.Conv2d, nn.Linear)) and getattr(module, "groups", 1) == 1:
            w = module.weight.detach().double()
            cols = w.abs().pow(power).transpose(0, 1).reshape(w.shape[1], -1).sum(1).numpy()
            add(("in", call.module), roots, cols)
    scores: dict[str, np.ndarray] = {}
    for group in groups_of(analysis):
        if not group.prunable:
            continue
        leader = analysis.producers[group.layers[0]]
        roots = analysis.units.roots(leader.ids)
        total = np.zeros(len(roots))
        kinds = ("bn",) if criterion == "bn_scale" else ("out", "in", "bn")
        for attempt in (kinds, ("out", "in", "bn")):
            for (kind, _), acc in per_layer.items():
                if kind not in attempt:
                    continue
                vec = np.array([acc.get(int(r), np.nan) for r in roots])
                if np.isnan(vec).all():
                    continue
                vec = np.nan_to_num(vec, nan=0.0)
                mean = vec.mean()
                total += vec / mean if mean > 0 else vec
            if total.any() or attempt != kinds:
                break
        scores[group.layers[0]] = total
    return scores


@dataclass(frozen=True)
class _Group:
    """Layers pruned together and where each of their units sits among the group's units.

    ``units``: the group's independent units (the leader ``layers[0]`` has them one-to-one);
    ``positions[name][j]``: the group unit that unit ``j`` of layer ``name`` belongs to; ``fixed``: group
    units that cannot be removed (tied to the model input or output, e.g. through a ``cat``). Tied layers need
    not have the group's size: the branches feeding a ``torch.cat`` that a depthwise conv reads each hold
    a slice of the conv's channels (16 + 16 + 8 of its 40), so one set of removed group units becomes a
    different index list per layer (:meth:`member_keep`).
    """

    layers: tuple[str, ...]
    units: int
    positions: Mapping[str, np.ndarray]
    fixed: frozenset[int] = frozenset()

    @classmethod
    def single(cls, model: nn.Module, name: str) -> "_Group":
        """Layer ``name`` as a group of its own (its units are the group's)."""
        units = _units(_layer(model, name))
        return cls((name,), units, {name: np.arange(units)})

    @property
    def label(self) -> str:
        return self.layers[0] if len(self.layers) == 1 else "+".join(self.layers)

    def member_keep(self, kept: Iterable[int]) -> dict[str, list[int]]:
        """``{layer: its own kept unit indices}`` when the group keeps the group units ``kept``."""
        wanted = set(int(u) for u in kept)
        return {name: [j for j, u in enumerate(self.positions[name].tolist()) if u in wanted] for name in self.layers}


def _groups(model: nn.Module, layers: list[str] | None, example_input: Any) -> list[_Group]:
    """Pruning groups: layers whose units are tied (pruned together), with each unit's group position.

    Without ``example_input`` each named layer is its own group. With it, the model is traced
    (:func:`moco.compress.surgery.dependency_groups`' analysis): the convolutions feeding one residual add,
    a depthwise conv and the layers feeding it (through a ``torch.cat`` too) are tied, and layers whose
    units cannot be removed (the model's output layer) are refused.
    """
    if example_input is None:
        if layers is None:
            raise MocoError("name the layers to prune (layers=[...]) or pass example_input= so that the output "
                            "layer and tied layers (residual adds) can be found by tracing")
        return [_Group.single(model, name) for name in layers]
    from moco.compress.surgery.analysis import analyse, groups_of

    analysis = analyse(copy.deepcopy(model), example_input)
    groups = []
    for g in groups_of(analysis):
        roots = analysis.units.roots
        index = {int(r): i for i, r in enumerate(roots(analysis.producers[g.layers[0]].ids).tolist())}
        positions = {n: np.array([index.get(int(r), -1) for r in roots(analysis.producers[n].ids).tolist()],
                                 dtype=np.int64) for n in g.layers}
        fixed = frozenset(i for r, i in index.items() if r in analysis.pinned)
        if g.prunable and any((pos < 0).any() for pos in positions.values()):
            # a member unit outside the leader's units: groups_of promised a leader spanning the group
            g = type(g)(g.layers, g.units, False, "their units are not all those of one layer")
        groups.append((g, _Group(tuple(g.layers), g.units, positions, fixed)))
    if layers is None:
        return [grp for g, grp in groups if g.prunable]
    by_layer = {name: (g, grp) for g, grp in groups for name in g.layers}
    chosen: list[_Group] = []
    for name in layers:
        if name not in by_layer:
            chosen.append(_Group.single(model, name))
            continue
        g, grp = by_layer[name]
        if not g.prunable:
            raise MocoError(f"layer {name!r} cannot be pruned: {g.reason or 'its units are tied to the output'}; "
                            "leave it out of layers")
        if all(c.layers != grp.layers for c in chosen):
            chosen.append(grp)
    return chosen


def _group_scores(importance: Mapping[str, np.ndarray], group: _Group, alive: np.ndarray | None = None,
                  *, shrunk: bool = False) -> np.ndarray:
    """A group's unit scores (one per group unit): the mean, over the layers holding a unit, of that
    unit's L1 divided by the layer's mean L1 over its live units.

    ``alive``: boolean mask of the group's live units (default all). ``shrunk``: the layers hold only
    their live units (a model made smaller by surgery), so ``importance[name]`` lists those alone.
    """
    live = np.ones(group.units, dtype=bool) if alive is None else np.asarray(alive, dtype=bool)
    total = np.zeros(group.units)
    count = np.zeros(group.units)
    for name in group.layers:
        pos = group.positions[name]
        if shrunk:
            pos = pos[live[pos]]
        s = np.asarray(importance[name], dtype=np.float64)
        if len(s) != len(pos):
            raise MocoError(f"layer {name!r} has {len(s)} units where its group expects {len(pos)}")
        on = live[pos]
        mean = s[on].mean() if on.any() else 0.0
        np.add.at(total, pos, s / mean if mean > 0 else np.zeros_like(s))
        np.add.at(count, pos, 1.0)
    return np.where(count > 0, total / np.maximum(count, 1.0), 0.0)


class _Budget:
    """Which of a group's live units may still go: not a fixed one, and every layer keeps
    ``min(min_units, its units)`` units."""

    def __init__(self, group: _Group, live: Iterable[int], min_units: int):
        live = set(int(u) for u in live)
        self.fixed = group.fixed
        self.holders: dict[int, list[str]] = {}
        self.left: dict[str, int] = {}
        self.floor: dict[str, int] = {}
        for name in group.layers:
            pos = group.positions[name].tolist()
            self.floor[name] = min(min_units, len(pos))
            self.left[name] = sum(u in live for u in pos)
            for u in pos:
                self.holders.setdefault(u, []).append(name)

    def take(self, unit: int) -> bool:
        """Remove ``unit`` if no layer falls below its floor; True when removed."""
        names = self.holders.get(int(unit), [])
        if int(unit) in self.fixed or any(self.left[n] - names.count(n) < self.floor[n] for n in set(names)):
            return False
        for n in names:
            self.left[n] -= 1
        return True


def _lowest(group: _Group, scores: np.ndarray, live: Sequence[int], n: int, min_units: int) -> list[int]:
    """Up to ``n`` of the ``live`` group units with the lowest scores, no layer left below ``min_units``."""
    budget = _Budget(group, live, min_units)
    live = np.asarray(live, dtype=np.int64)
    picked = []
    for u in live[np.argsort(scores[live], kind="stable")].tolist():
        if len(picked) == n:
            break
        if budget.take(u):
            picked.append(u)
    return sorted(picked)


def select_one_shot(
    model: nn.Module,
    ratio: float,
    *,
    scope: str = "layer",
    layers: Iterable[str] | str | None = None,
    example_input: torch.Tensor | None = None,
    min_units: int = 1,
    importance: str = "l1",
) -> dict[str, list[int]]:
    """Choose the units to keep when removing a fraction ``ratio`` of them at once by L1 importance.

    ``ratio``: fraction of units removed, in [0, 1) (0.75 keeps a quarter). ``scope="layer"``: every
    layer loses ``floor(ratio * units)`` of its own lowest-L1 units. ``scope="global"``: the units of
    all layers compete; each layer's L1 values are divided by that layer's mean L1 first (layers have
    different fan-in, so raw L1 values are not comparable), and the ``floor(ratio * total units)``
    lowest are removed. Either way every layer keeps at least ``min_units``.

    ``layers``: names of the Conv2d / Linear layers to prune (default: every prunable layer, which
    needs ``example_input``). With ``example_input`` the model is traced
    (:func:`moco.compress.surgery.dependency_groups`): tied layers (e.g. the convolutions feeding a
    residual add) are pruned with the same indices, scored by the mean of their normalised L1, and the
    output layer is refused. Returns ``{layer: sorted kept indices}`` for :func:`moco.compress.surgery.apply`.

    ``importance``: ``"l1"`` (default: the producing layers' filter L1, as above), or a group criterion
    of :func:`group_importance` (``"group_l1"``, ``"group_l2"``, ``"bn_scale"``: scored over the whole
    dependency group, consumers and BatchNorms included; needs ``example_input``).
    """
    _check_model(model)
    ratio = _as_fraction(ratio, "ratio")
    if not 0 <= ratio < 1:
        raise MocoError(f"ratio is the fraction of units to remove and must be in [0, 1), got {ratio}")
    if scope not in ("layer", "global"):
        raise MocoError(f"scope must be 'layer' or 'global', got {scope!r}")
    if isinstance(min_units, bool) or not isinstance(min_units, int) or min_units < 1:
        raise MocoError(f"min_units must be an int >= 1, got {min_units!r}")
    if importance not in IMPORTANCE_CRITERIA:
        raise MocoError(f"importance must be one of {IMPORTANCE_CRITERIA}, got {importance!r}")
    if importance != "l1" and example_input is None:
        raise MocoError(f"importance={importance!r} scores units over their dependency group, found by tracing: "
                        "pass example_input= (one input batch)")
    names = None if layers is None else _layer_list(model, layers)
    groups = _groups(model, names, example_input)
    if not groups:
        raise MocoError("no prunable layers found")
    if importance == "l1":
        l1 = l1_importance(model, sorted({n for g in groups for n in g.layers}))
        scores = [_group_scores(l1, g) for g in groups]
    else:
        by_leader = group_importance(model, example_input, importance)
        scores = []
        for g in groups:
            if g.layers[0] not in by_leader:
                raise MocoError(f"layers {list(g.layers)} are not a prunable dependency group of the traced model")
            scores.append(by_leader[g.layers[0]])
    removed: list[list[int]] = []
    if scope == "layer":
        for g, s in zip(groups, scores):
            n_remove = min(int(math.floor(ratio * g.units + 1e-9)), max(g.units - min_units, 0))
            removed.append(_lowest(g, s, range(g.units), n_remove, min_units))
    else:
        budget = int(math.floor(ratio * sum(g.units for g in groups) + 1e-9))
        budgets = [_Budget(g, range(g.units), min_units) for g in groups]
        removed = [[] for _ in groups]
        order = sorted(((float(v), gi, u) for gi, s in enumerate(scores) for u, v in enumerate(s)))
        for _, gi, u in order:
            if budget == 0:
                break
            if groups[gi].units - len(removed[gi]) > min_units and budgets[gi].take(u):
                removed[gi].append(u)
                budget -= 1
    keep: dict[str, list[int]] = {}
    for g, r in zip(groups, removed):
        gone = set(r)
        keep.update(g.member_keep(u for u in range(g.units) if u not in gone))
    return keep


# ------------------------------------------------------------------------------------------ masking


def _check_keep(model: nn.Module, keep: Mapping[str, Any]) -> dict[str, list[int]]:
    if not isinstance(keep, Mapping):
        raise TypeError(f"keep must be a dict layer name -> kept unit indices, got {type(keep).__name__}")
    out = {}
    for name, idx in keep.items():
        module = _layer(model, name)
        if isinstance(idx, torch.Tensor):
            idx = idx.tolist()
        values = [int(i) for i in np.asarray(list(idx)).reshape(-1)]
        units = _units(module)
        if len(set(values)) != len(values):
            raise MocoError(f"keep[{name!r}] lists a unit twice")
        bad = [i for i in values if not 0 <= i < units]
        if bad:
            raise MocoError(f"keep[{name!r}] has indices {bad[:5]} outside 0..{units - 1}")
        if not values:
            raise MocoError(f"keep[{name!r}] is empty; a layer must keep at least one unit")
        out[name] = sorted(values)
    return out


def _bn_followers(model: nn.Module) -> dict[str, list[str]]:
    """Layer name -> BatchNorm modules that read its output directly (found with torch.fx; {} if untraceable)."""
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - best effort: plain conv/linear masks still hold
        return {}
    modules = dict(model.named_modules())
    out: dict[str, list[str]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), PRUNABLE_TYPES):
            for user in node.users:
                if user.op == "call_module" and isinstance(modules.get(user.target), nn.modules.batchnorm._BatchNorm):
                    out.setdefault(node.target, []).append(user.target)
    return out


def _mask_tensors(model: nn.Module, keep: Mapping[str, list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, 0/1 mask of the same shape) pairs zeroing the pruned units of ``keep``.

    A unit's weights and bias are masked, and so are the scale and shift of a BatchNorm that reads the
    layer directly, so the masked unit outputs exactly zero as if it were removed.
    """
    followers = _bn_followers(model)
    modules = dict(model.named_modules())
    pairs = []
    for name, kept in keep.items():
        module = modules[name]
        alive = torch.zeros(_units(module), dtype=torch.bool)
        alive[list(kept)] = True
        targets = [module] + [modules[b] for b in followers.get(name, [])]
        for target in targets:
            for pname in ("weight", "bias"):
                p = getattr(target, pname, None)
                if isinstance(p, torch.Tensor):
                    shape = (-1,) + (1,) * (p.dim() - 1)
                    mask = alive.to(p.dtype).reshape(shape).expand_as(p).clone()
                    pairs.append((p, mask))
    return pairs


@torch.no_grad()
def _apply_masks(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for p, mask in pairs:
        p.mul_(mask)


class _HoldMasked:
    """Context: gradient hooks that zero the gradient of masked entries, so an optimizer with a fresh
    state leaves them exactly zero (Adam and SGD with momentum, weight decay included); the masks are
    re-applied on exit as a safety net. Works only on moco's private copy of a model."""

    def __init__(self, pairs):
        self.pairs, self.handles = pairs, []

    def __enter__(self):
        _apply_masks(self.pairs)
        for p, mask in self.pairs:
            if p.requires_grad:
                self.handles.append(p.register_hook(lambda g, m=mask: g * m.to(g.device)))  # the model may train on a GPU
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        _apply_masks(self.pairs)
        return False


def masked_copy(model: nn.Module, keep: Mapping[str, Any]) -> nn.Module:
    """Seed 003's emulation of pruning: a deep copy of ``model`` whose pruned units are zeroed.

    ``keep``: ``{layer: kept unit indices}`` as for :func:`moco.compress.surgery.apply`. In the copy
    every unit not kept has its weights and bias set to 0 (and the scale/shift of a BatchNorm reading
    it directly), so it outputs 0; the copy has the original's size and runs at its speed. The caller's
    model is not modified.
    """
    _check_model(model)
    work = copy.deepcopy(model)
    keep = _check_keep(work, keep)
    _apply_masks(_mask_tensors(work, keep))
    return work


@torch.no_grad()
def masked_equivalent(original: nn.Module, small: nn.Module, keep: Mapping[str, Any], *,
                      example_input: torch.Tensor, atol: float = 1e-4) -> nn.Module:
    """The zero-masked twin of ``small`` in ``original``'s architecture (seed 003's "pruned model").

    ``small`` must be ``moco.compress.surgery.apply(m, keep, example_input)`` of a model ``m`` shaped
    like ``original`` (possibly fine-tuned since). Returns a deep copy of ``original`` holding ``small``'s
    weights at the kept positions and zeros elsewhere; it computes the same function as ``small`` at the
    original size. The positions are found by running the surgery on a copy whose entries are their own
    indices, so every rule of the surgery (flatten groups, tied layers) is followed. Raises MocoError
    when the result's outputs on ``example_input`` differ from ``small``'s by more than ``atol``.
    """
    from moco.compress.surgery import apply

    _check_model(original)
    _check_model(small)
    keep = _check_keep(original, keep)
    probe = copy.deepcopy(original).double()
    tensors = {**dict(probe.named_parameters()), **dict(probe.named_buffers())}
    for t in tensors.values():
        if t.is_floating_point():
            t.copy_(torch.arange(t.numel(), dtype=torch.float64).reshape(t.shape))
    index_model = apply(probe, keep, example_input=example_input.double())
    out = copy.deepcopy(original)
    target = {**dict(out.named_parameters()), **dict(out.named_buffers())}
    source = {**dict(small.named_parameters()), **dict(small.named_buffers())}
    positions = {**dict(index_model.named_parameters()), **dict(index_model.named_buffers())}
    for name, t in target.items():
        if not t.is_floating_point():
            if name in source:
                t.copy_(source[name])
            continue
        if name not in source or name not in positions:
            raise MocoError(f"{name!r} of the original has no counterpart in the smaller model; was `small` made "
                            "by moco.compress.surgery.apply from this architecture?")
        pos = positions[name].reshape(-1).round().long()
        src = source[name].detach().reshape(-1).to(t.dtype)
        if pos.numel() != src.numel():
            raise MocoError(f"{name!r}: the smaller model has {src.numel()} entries, the surgery of `keep` gives "
                            f"{pos.numel()}; pass the keep dict the smaller model was made with")
        if name.endswith("running_var"):
            flat = torch.ones(t.numel(), dtype=t.dtype)
        else:
            flat = torch.zeros(t.numel(), dtype=t.dtype)
        flat[pos] = src
        t.copy_(flat.reshape(t.shape))
    out.train(small.training)
    was = (out.training, small.training)
    out.eval(), small.eval()
    try:
        diff = float((out(example_input) - small(example_input)).abs().max())
    finally:
        out.train(was[0]), small.train(was[1])
    if not diff <= atol:
        raise MocoError(f"the zero-masked model differs from the smaller one by {diff:.3g} > atol {atol:g} on "
                        "example_input; pass the keep dict the smaller model was made with")
    return out


# ------------------------------------------------------------------------------------------ iterative


@dataclass(frozen=True)
class PruneStep:
    """One step of :class:`IterativePruner`: the units of ``layer`` removed together and what it cost.

    Accuracies are fractions on the validation data: ``accuracy_before`` (current model),
    ``accuracy_pruned`` (right after zeroing the units), ``accuracy_retrained`` (after retraining);
    ``drop_points`` = (unpruned accuracy - retrained accuracy) * 100, in percentage points;
    ``accepted``: False when the drop exceeded the threshold and the step was rolled back;
    ``units_before`` / ``units_after``: the layer's live units before / after the step (after = before
    when rolled back); ``seconds``: wall-clock time of the step.
    """

    step: int
    layer: str
    removed: tuple[int, ...]
    units_before: int
    units_after: int
    accuracy_before: float
    accuracy_pruned: float
    accuracy_retrained: float
    drop_points: float
    accepted: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the fields (``removed`` as a list)."""
        d = asdict(self)
        d["removed"] = list(self.removed)
        return d


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    from moco.train import evaluate

    return evaluate(model, (x, y), batch_size=max(batch_size, 1000)).accuracy


def _labelled_tensors(data: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    pair = as_tensors(data)
    if pair is None:
        raise TypeError(f"{what} must be in memory: an (x, y) pair of tensors or a dataset with .tensors(), "
                        f"got {type(data).__name__}")
    x, y = pair
    if y is None:
        raise MocoError(f"{what} has no labels; pass (x, y)")
    if len(x) == 0:
        raise MocoError(f"{what} is empty; pass at least one labelled sample")
    return x, y


class IterativePruner:
    """Seed 003's prune-retrain loop with L1 importance, batched to run in minutes on a CPU.

    Layers are pruned one after the other, in the order given (seed 003: conv1, conv2, hidden). For
    each layer, one step:

    1. ranks the layer's live units by L1 norm (:func:`l1_importance`, current weights) and zeroes the
       ``n`` lowest (weights, bias, a directly following BatchNorm's scale/shift);
    2. evaluates on ``val_data`` (``accuracy_pruned``), retrains for ``retrain_epochs`` epoch(s) on a
       fresh random subset of ``retrain_samples`` training samples with the pruned entries held at
       exactly zero (their gradients are masked), and evaluates again (``accuracy_retrained``);
    3. accepts the step if the drop against the unpruned model, ``base - retrained``, is at most
       ``drop_threshold``; otherwise restores the weights from before the step (rollback).

    Schedule: the first step of a layer removes ``n = max(1, round(step * live units))`` units
    (``step`` a fraction in (0, 1]) or ``step`` units (an int); after an accepted step ``n`` is
    recomputed from the live units but never above the current cap; after a rolled-back step the cap
    halves. The layer is done when a 1-unit step is rolled back, ``min_units`` remain, or
    ``max_steps`` steps (all layers together) have run.

    Two ways to hold a step's pruned units, with the same result (a fresh optimizer per retrain, so
    zero gradients leave zero weights exactly zero): without ``example_input`` the work model keeps
    its size and the pruned units are zeroed and held at zero (seed 003's emulation; any model with
    Conv2d/Linear layers). With ``example_input`` every step is a real surgery
    (:func:`moco.compress.surgery.apply`): the trial model is physically smaller, so evaluating and
    retraining get cheaper as pruning proceeds, a rollback just drops the trial, and tied layers
    (:func:`moco.compress.surgery.dependency_groups`, e.g. a residual add) are pruned together.

    Parameters: ``layers`` (Conv2d/Linear names, in pruning order), ``drop_threshold`` (a fraction of
    accuracy, 0.01 = 1 point), ``step``, ``min_units`` (per layer), ``retrain_samples`` (None: all),
    ``retrain_epochs``, ``lr``, ``optimizer`` (``"adam"``/``"sgd"``), ``batch_size``, ``seed``,
    ``example_input`` (one input batch; switches to surgery per step), ``max_steps``, ``round_to``
    (None, an int, or ``"auto"``: every step leaves a multiple of it, raising ``n`` as needed, so the
    kept widths suit ONNX Runtime's channel blocks: :func:`moco.compress.pfa.partial_keep`), ``progress``.

    After :meth:`fit`: ``keep_`` (``{layer: kept indices}`` for ``surgery.apply``), ``model_`` (the
    zero-masked, retrained copy at the original size, in eval mode; the caller's model is never
    modified; None, with a warning, when no zero-masked model computes what the smaller one does, e.g. a
    LayerNorm over a pruned Linear's outputs takes the zeros into its statistics), ``small_`` (with
    ``example_input``: the physically smaller retrained model, which computes what ``model_`` computes;
    else None), ``log_`` (tuple of :class:`PruneStep`),
    ``base_accuracy_``, ``accuracy_`` (validation accuracy of the result), ``units_`` (original units
    per layer), ``history_`` (``keep`` after every accepted step, for Pareto plots), ``seconds_``.
    """

    def __init__(
        self,
        layers: Sequence[str],
        *,
        drop_threshold: float = 0.01,
        step: float | int = 0.25,
        min_units: int = 1,
        retrain_samples: int | None = 10_000,
        retrain_epochs: int = 1,
        lr: float = 1e-3,
        optimizer: str = "adam",
        batch_size: int = 128,
        seed: int = 0,
        example_input: torch.Tensor | None = None,
        max_steps: int = 500,
        round_to: int | str | None = None,
        progress: bool = True,
    ):
        self.layers = layers
        self.drop_threshold = drop_threshold
        self.step = step
        self.min_units = min_units
        self.retrain_samples = retrain_samples
        self.retrain_epochs = retrain_epochs
        self.lr = lr
        self.optimizer = optimizer
        self.batch_size = batch_size
        self.seed = seed
        self.example_input = example_input
        self.max_steps = max_steps
        self.round_to = round_to
        self.progress = progress

    def _check_params(self) -> None:
        thr = _as_fraction(self.drop_threshold, "drop_threshold")
        if not 0 <= thr < 1:
            raise MocoError(f"drop_threshold is the largest accepted accuracy drop as a fraction (0.01 = 1 point); "
                            f"it must be in [0, 1), got {thr}")
        s = self.step
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise MocoError(f"step must be a fraction in (0, 1] or an int >= 1 (units per step), got {s!r}")
        if isinstance(s, float) and not 0 < s <= 1:
            raise MocoError(f"step as a float is the fraction of live units removed per step, in (0, 1]; got {s}")
        if isinstance(s, int) and s < 1:
            raise MocoError(f"step as an int is the number of units removed per step, >= 1; got {s}")
        check_counts(self, ("min_units", "retrain_epochs", "batch_size", "max_steps"), optional=("retrain_samples",))
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise MocoError(f"lr must be > 0, got {self.lr!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise MocoError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        from moco.compress.pfa.loop import check_round_to

        self._round = check_round_to(self.round_to)

    def _n_for(self, live: int) -> int:
        if isinstance(self.step, int):
            return self.step
        return max(1, int(round(self.step * live)))

    def _rounded_n(self, live: int, n: int) -> int:
        """``n`` units to remove from ``live``, raised so that the units left are a multiple of ``round_to``
        (at least one multiple and ``min_units``); 0 when no such step exists (the layer is done)."""
        r = self._round
        if not r:
            return n
        floor = -(-self.min_units // r) * r
        left = max(floor, (live - n) // r * r)
        return max(0, live - left)

    def fit(self, model: nn.Module, train_data: Any, val_data: Any) -> "IterativePruner":
        """Prune a copy of ``model``; ``train_data`` for retraining, ``val_data`` (a split of the training
        data, never the test set) for the accuracy drop. Both ``(x, y)`` tensors or a dataset with
        ``.tensors()``. Returns self."""
        from moco.train import fit as train_fit

        _check_model(model)
        self._check_params()
        names = _layer_list(model, self.layers, allow_none=False)
        x_tr, y_tr = _labelled_tensors(train_data, "train_data")
        x_va, y_va = _labelled_tensors(val_data, "val_data")
        groups = _groups(model, names, self.example_input)
        physical = self.example_input is not None
        if physical:
            from moco.compress.surgery import apply
        t_start = time.perf_counter()
        work = copy.deepcopy(model)
        units = {name: len(g.positions[name]) for g in groups for name in g.layers}
        live = [list(range(g.units)) for g in groups]  # per group: its live group units
        base = _evaluate(work, x_va, y_va, self.batch_size)
        current = base
        gen = torch.Generator().manual_seed(self.seed)
        log: list[PruneStep] = []
        history: list[dict[str, list[int]]] = []
        thr = float(self.drop_threshold)

        def keep_now() -> dict[str, list[int]]:
            return {name: kept for g, alive in zip(groups, live) for name, kept in g.member_keep(alive).items()}

        bar = tqdm(total=sum(len(v) for v in live), desc="pruning", unit="unit",
                   disable=not show_progress(self.progress), leave=False)
        steps = 0
        for gi, g in enumerate(groups):
            cap = self._n_for(len(live[gi]))
            while len(live[gi]) > self.min_units and steps < self.max_steps:
                t0 = time.perf_counter()
                n = self._rounded_n(len(live[gi]), min(cap, self._n_for(len(live[gi])), len(live[gi]) - self.min_units))
                if n == 0:
                    break
                mask = np.zeros(g.units, dtype=bool)
                mask[live[gi]] = True
                scores = _group_scores(l1_importance(work, list(g.layers)), g, mask, shrunk=physical)
                removed = _lowest(g, scores, live[gi], n, self.min_units)
                if not removed or (self._round and len(removed) < n):
                    break  # every live unit left is some layer's last (or a rounded step no longer fits)
                gone = set(removed)
                kept = [u for u in live[gi] if u not in gone]
                if physical:  # the work model holds only the live units: name them by their local index
                    now, after = g.member_keep(live[gi]), g.member_keep(kept)
                    local = {}
                    for name in g.layers:
                        stays = set(after[name])
                        local[name] = [i for i, j in enumerate(now[name]) if j in stays]
                    trial = apply(work, local, example_input=self.example_input)
                    pairs = None
                else:  # the work model has every unit; the pruned ones are held at zero
                    snapshot = copy.deepcopy(work.state_dict())
                    pairs = _mask_tensors(work, {**keep_now(), **g.member_keep(kept)})
                    _apply_masks(pairs)
                    trial = work
                acc_pruned = _evaluate(trial, x_va, y_va, self.batch_size)
                steps += 1
                idx = torch.randperm(len(x_tr), generator=gen)
                if self.retrain_samples is not None:
                    idx = idx[: self.retrain_samples]
                with _HoldMasked(pairs or []):
                    train_fit(trial, (x_tr[idx], y_tr[idx]), epochs=self.retrain_epochs, batch_size=self.batch_size,
                              lr=self.lr, optimizer=self.optimizer, seed=self.seed + steps, progress=False)
                acc_retrained = _evaluate(trial, x_va, y_va, self.batch_size)
                drop = base - acc_retrained
                accepted = drop <= thr + 1e-12
                before = len(live[gi])
                if accepted:
                    live[gi] = kept
                    history.append(keep_now())
                    bar.update(len(removed))
                    work = trial
                elif not physical:
                    work.load_state_dict(snapshot)  # roll back (the physical trial is simply dropped)
                log.append(PruneStep(
                    step=steps, layer=g.label, removed=tuple(int(r) for r in removed),
                    units_before=before, units_after=len(live[gi]), accuracy_before=current,
                    accuracy_pruned=acc_pruned, accuracy_retrained=acc_retrained, drop_points=100.0 * drop,
                    accepted=accepted, seconds=time.perf_counter() - t0,
                ))
                bar.set_postfix(layer=g.layers[0], units=len(live[gi]), acc=f"{(acc_retrained if accepted else current):.4f}")
                if accepted:
                    current = acc_retrained
                else:
                    if len(removed) <= self._rounded_n(before, 1):  # the smallest step was rolled back
                        break
                    cap = max(1, len(removed) // 2)
        bar.close()
        work.eval()
        self.keep_ = keep_now()
        if physical:
            self.small_ = work
            try:
                self.model_ = masked_equivalent(model, work, self.keep_, example_input=self.example_input).eval()
            except MocoError as exc:
                # zeroed units are not absent units for a norm over them (a LayerNorm after a pruned Linear takes
                # the zeros into its mean and variance): no zero-masked model computes what the smaller one does.
                # The smaller model is the result; the emulation is only a comparison, so its absence is a warning.
                self.model_ = None
                warnings.warn(f"no zero-masked twin of the pruned model: {exc}; model_ is None, small_ is the "
                              "result", stacklevel=2)
        else:
            self.small_ = None
            self.model_ = work
        self.log_ = tuple(log)
        self.history_ = tuple(history)
        self.base_accuracy_ = base
        self.accuracy_ = current
        self.units_ = units
        self.seconds_ = time.perf_counter() - t_start
        return self

    def to_dataframe(self):
        """The pruning log as a pandas DataFrame, one row per step (see :class:`PruneStep`)."""
        import pandas as pd

        if not hasattr(self, "log_"):
            raise MocoError("call fit(model, train_data, val_data) before to_dataframe()")
        return pd.DataFrame([s.to_dict() for s in self.log_]).set_index("step") if self.log_ else pd.DataFrame()

    def summary(self) -> dict[str, Any]:
        """Units per layer before/after, base and final validation accuracy (fractions), steps, seconds."""
        if not hasattr(self, "log_"):
            raise MocoError("call fit(model, train_data, val_data) before summary()")
        return {
            "units_before": dict(self.units_),
            "units_after": {k: len(v) for k, v in self.keep_.items()},
            "accuracy_base_val": self.base_accuracy_,
            "accuracy_val": self.accuracy_,
            "steps": len(self.log_),
            "accepted_steps": sum(s.accepted for s in self.log_),
            "seconds": self.seconds_,
        }

    # ------------------------------------------------------------------ result protocol
    def to_frame(self):
        """The pruning log as a pandas DataFrame (:meth:`to_dataframe`)."""
        return self.to_dataframe()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: :meth:`summary`, ``keep_`` and every step of the log."""
        if not hasattr(self, "log_"):
            raise MocoError("call fit(model, train_data, val_data) before to_dict()")
        return {**self.summary(), "keep": {k: list(v) for k, v in self.keep_.items()},
                "log": [s.to_dict() for s in self.log_]}

    def to_text(self) -> str:
        """The whole log as a table (every column, no truncation) and the summary line."""
        if not hasattr(self, "log_"):
            return f"IterativePruner(layers={list(self.layers)}, drop_threshold={self.drop_threshold}, unfitted)"
        frame = self.to_dataframe().drop(columns=["removed"], errors="ignore")
        s = self.summary()
        units = ", ".join(f"{k}: {s['units_before'][k]} -> {v}" for k, v in s["units_after"].items())
        return (frame.to_string() + f"\nunits {units}; validation accuracy {s['accuracy_base_val']:.4f} -> "
                f"{s['accuracy_val']:.4f}; {s['accepted_steps']} of {s['steps']} steps accepted in {s['seconds']:.1f} s")

    def __str__(self) -> str:
        return self.to_text()


# ------------------------------------------------------------------------------ comparing criteria


@dataclass(frozen=True)
class ImportanceRow:
    """One criterion of :func:`compare_importance`: accuracy (fraction) right after the cut and after fine-tuning."""

    criterion: str
    macs_reduction: float
    accuracy_pruned: float
    accuracy_finetuned: float
    seconds: float


@dataclass(frozen=True)
class ImportanceComparison:
    """The result of :func:`compare_importance`: same MAC budget, same fine-tuning, one row per criterion.

    ``ratio``: the per-layer fraction of units removed (the same for every criterion, so the MACs are
    equal); ``base_accuracy``: the original model on the evaluation data (fraction); ``rows``.
    """

    ratio: float
    base_accuracy: float
    macs_target: float
    finetune: dict
    rows: tuple[ImportanceRow, ...]

    @property
    def best(self) -> str:
        """The criterion with the highest accuracy after fine-tuning (first on ties)."""
        return max(self.rows, key=lambda r: r.accuracy_finetuned).criterion

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field, ``best`` included."""
        return {"ratio": self.ratio, "base_accuracy": self.base_accuracy, "macs_target": self.macs_target,
                "finetune": dict(self.finetune), "best": self.best, "rows": [asdict(r) for r in self.rows]}

    def to_frame(self):
        """One row per criterion (pandas DataFrame)."""
        import pandas as pd

        return pd.DataFrame([asdict(r) for r in self.rows])

    def to_text(self) -> str:
        """The table (every column) and which criterion kept the most accuracy."""
        frame = self.to_frame()
        frame["drop_points"] = 100.0 * (self.base_accuracy - frame["accuracy_finetuned"])
        return (f"{self.ratio:.3f} of every group's units removed (>= {self.macs_target:g}x fewer MACs), "
                f"original accuracy {self.base_accuracy:.4f}; fine-tuning {self.finetune}\n"
                + frame.to_string(index=False) + f"\nbest: {self.best}")

    def __str__(self) -> str:
        return self.to_text()


def _ratio_for_macs(model: nn.Module, example_input: Any, target: float) -> tuple[float, float]:
    """Smallest per-layer removal ratio (bisection, 1e-3) whose one-shot cut reaches ``target``x fewer MACs."""
    from moco.compress.surgery import apply
    from moco.profile import profile

    base = profile(model, example_input, latency=False).totals.macs

    def reduction(ratio: float) -> float:
        small = apply(model, select_one_shot(model, ratio, example_input=example_input), example_input)
        return base / profile(small, example_input, latency=False).totals.macs

    lo, hi = 0.0, 0.95
    if reduction(hi) < target:
        raise MocoError(f"even removing 95% of every layer's units gives only {reduction(hi):.2f}x fewer MACs; "
                        f"ask for less than {target}x")
    while hi - lo > 1e-3:
        mid = (lo + hi) / 2
        if reduction(mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi, reduction(hi)


def compare_importance(
    model: nn.Module,
    train_data: Any,
    eval_data: Any,
    *,
    example_input: torch.Tensor,
    macs_reduction: float = 2.0,
    criteria: Sequence[str] = IMPORTANCE_CRITERIA,
    finetune_epochs: int = 1,
    finetune_samples: int | None = 10_000,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
) -> ImportanceComparison:
    """Which importance criterion keeps more accuracy at the same MACs after the same fine-tuning?

    Finds the per-layer removal ratio that reaches ``macs_reduction`` x fewer MACs (bisection; every
    criterion removes the same number of units per dependency group, so the MACs are equal), then for
    each criterion: one-shot selection (:func:`select_one_shot`), surgery, accuracy on ``eval_data``,
    ``finetune_epochs`` of fine-tuning on the same seeded subset of ``finetune_samples`` training samples
    (cosine schedule), accuracy again. ``train_data`` / ``eval_data``: ``(x, y)`` tensors or datasets
    with ``.tensors()`` (use a validation split, not the test set, to *choose* a criterion). The model
    is not modified.
    """
    from moco.compress.finetune import finetune
    from moco.compress.surgery import apply
    from moco.train import evaluate

    _check_model(model)
    bad = [c for c in criteria if c not in IMPORTANCE_CRITERIA]
    if bad or not criteria:
        raise MocoError(f"criteria must be a non-empty list from {IMPORTANCE_CRITERIA}, got {list(criteria)!r}")
    x_tr, y_tr = _labelled_tensors(train_data, "train_data")
    x_ev, y_ev = _labelled_tensors(eval_data, "eval_data")
    ratio, _ = _ratio_for_macs(model, example_input, float(macs_reduction))
    base = _evaluate(model, x_ev, y_ev, batch_size)
    idx = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(seed))
    if finetune_samples is not None:
        idx = idx[:finetune_samples]
    from moco.profile import profile

    base_macs = profile(model, example_input, latency=False).totals.macs
    rows = []
    for criterion in criteria:
        t0 = time.perf_counter()
        keep = select_one_shot(model, ratio, example_input=example_input, importance=criterion)
        small = apply(model, keep, example_input)
        macs = base_macs / profile(small, example_input, latency=False).totals.macs
        pruned = evaluate(small, (x_ev, y_ev), batch_size=max(batch_size, 1000)).accuracy
        finetune(small, (x_tr[idx], y_tr[idx]), epochs=finetune_epochs, lr=lr, batch_size=batch_size, seed=seed,
                 schedule="cosine", progress=False)
        tuned = evaluate(small, (x_ev, y_ev), batch_size=max(batch_size, 1000)).accuracy
        rows.append(ImportanceRow(criterion, float(macs), pruned, tuned, time.perf_counter() - t0))
    return ImportanceComparison(ratio, base, float(macs_reduction),
                                {"epochs": finetune_epochs, "samples": len(idx), "lr": lr, "schedule": "cosine"},
                                tuple(rows))
