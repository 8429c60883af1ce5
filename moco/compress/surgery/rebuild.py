"""``apply``: a new, physically smaller model keeping the chosen units, every dependent layer adjusted."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from moco.compress.surgery.analysis import Analysis, analyse, layer_error
from moco.compress.surgery.errors import SurgeryError
from moco.compress.surgery.modules import resized_module

__all__ = ["apply"]


def _indices(raw, name: str, units: int) -> np.ndarray:
    """``raw`` (ints, numpy, tensor) as sorted unique unit indices of layer ``name``; errors for bad values."""
    if isinstance(raw, torch.Tensor):
        raw = raw.detach().cpu().numpy()
    if isinstance(raw, (str, bytes)) or not isinstance(raw, (Iterable, np.ndarray)):
        raise TypeError(f"keep[{name!r}] must be an iterable of unit indices (ints), got {type(raw).__name__}")
    arr = np.asarray(list(raw) if not isinstance(raw, np.ndarray) else raw)
    if arr.dtype == bool:
        raise TypeError(
            f"keep[{name!r}] is a boolean mask; pass the indices to keep, e.g. numpy.flatnonzero(mask)"
        )
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"keep[{name!r}] must hold integer unit indices, got dtype {arr.dtype}")
    arr = arr.reshape(-1).astype(np.int64)
    if arr.size == 0:
        raise SurgeryError(
            f"keep[{name!r}] is empty: a layer must keep at least one of its {units} units "
            f"(to remove a whole layer, change the architecture instead)"
        )
    bad = arr[(arr < 0) | (arr >= units)]
    if bad.size:
        raise SurgeryError(
            f"keep[{name!r}] has index {int(bad[0])} out of range: the layer has {units} units (0..{units - 1})"
        )
    uniq, counts = np.unique(arr, return_counts=True)
    if (counts > 1).any():
        raise SurgeryError(f"keep[{name!r}] lists unit {int(uniq[counts > 1][0])} more than once; give each index once")
    return uniq


def _decide(analysis: Analysis, keep: dict[str, np.ndarray]) -> set[int]:
    """Roots of the unit classes to remove; errors for pinned units and conflicting requests."""
    units = analysis.units
    status: dict[int, tuple[bool, str, int]] = {}
    for name, idx in keep.items():
        producer = analysis.producers[name]
        wanted = np.zeros(producer.units, dtype=bool)
        wanted[idx] = True
        for unit, (uid, want) in enumerate(zip(producer.ids.tolist(), wanted.tolist())):
            root = units.find(uid)
            if root in status:
                prev_keep, prev_name, prev_unit = status[root]
                if prev_keep != want:
                    ties = "; ".join(analysis.tie_reasons(root)) or "an element-wise op"
                    k, r = (prev_name, prev_unit), (name, unit)
                    if not prev_keep:
                        k, r = r, k
                    who = (
                        f"layer {name!r} keeps unit {k[1]} but removes unit {r[1]}"
                        if prev_name == name
                        else f"layer {k[0]!r} keeps unit {k[1]} but layer {r[0]!r} removes unit {r[1]}"
                    )
                    raise SurgeryError(
                        f"conflicting keep sets: {who}, and these units are tied by {ties}; tied units are kept "
                        f"or removed together, so name one layer of the group (see dependency_groups) or give "
                        f"all of them the same indices"
                    )
                continue
            if not want and root in analysis.pinned:
                raise SurgeryError(
                    f"cannot remove unit {unit} of layer {name!r} (nor the units tied to it): "
                    f"{analysis.pinned[root]}; keep that unit (dependency_groups marks layers whose units "
                    f"are all pinned prunable=False)"
                )
            status[root] = (want, name, unit)
    return {root for root, (want, _, _) in status.items() if not want}


def _kept(analysis: Analysis, ids: np.ndarray, removed: set[int]) -> np.ndarray:
    return np.fromiter((analysis.units.find(int(i)) not in removed for i in ids), dtype=bool, count=len(ids))


def _plan(analysis: Analysis, removed: set[int]) -> dict[str, dict]:
    """For each module to resize: boolean masks of kept output and input units (None: all kept)."""
    plans: dict[str, dict] = {}
    for call in analysis.calls:
        producer = analysis.producers.get(call.module)
        in_mask = _kept(analysis, call.in_slots, removed)
        out_mask = _kept(analysis, producer.ids, removed) if producer is not None else in_mask
        plan = {"in": in_mask, "out": out_mask}
        old = plans.get(call.module)
        if old is not None and not (np.array_equal(old["in"], in_mask) and np.array_equal(old["out"], out_mask)):
            raise SurgeryError(
                f"module {call.module!r} is called more than once (node {call.node!r}) on inputs whose channels "
                f"are pruned differently; use a separate module per call or keep those channels"
            )
        plans[call.module] = plan
    return {name: p for name, p in plans.items() if not (p["in"].all() and p["out"].all())}


def _index(mask: np.ndarray) -> torch.Tensor | None:
    return None if mask.all() else torch.from_numpy(np.flatnonzero(mask))


def _replacement(name: str, module: nn.Module, plan: dict) -> nn.Module:
    out_mask, in_mask = plan["out"], plan["in"]
    if not out_mask.any() or not in_mask.any():
        what = "outputs" if not out_mask.any() else "inputs"
        raise SurgeryError(f"surgery would leave layer {name!r} with no {what}; keep more units")
    if isinstance(module, nn.Conv2d) and module.groups > 1:
        groups = int(in_mask.sum()) // (module.in_channels // module.groups)
        return resized_module(module, out_idx=_index(out_mask), in_idx=None, groups=groups)
    return resized_module(module, out_idx=_index(out_mask), in_idx=_index(in_mask))


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def apply(model: nn.Module, keep: Mapping[str, Iterable[int]], example_input, *, check: bool = True) -> nn.Module:
    """A NEW dense model keeping only the units named in ``keep``; ``model`` itself is never modified.

    Args:
        model: the trained model (any ``nn.Module`` torch.fx can trace).
        keep: qualified layer name (as in ``model.named_modules()``) of an ``nn.Conv2d`` (output channels)
            or ``nn.Linear`` (output features) -> indices of the units to keep (ints, numpy array or tensor;
            sorted on use). Layers not named keep all units, unless tied to a named layer (a residual add,
            a depthwise conv): one named member decides for its whole group.
        example_input: one input batch, e.g. ``torch.randn(1, 1, 28, 28)``, used to trace the model and
            propagate shapes (the model runs once on it in eval mode, on a copy).
        check: run the smaller model on ``example_input`` afterwards and compare output shapes.

    Every dependent layer is resized: the next conv's input channels, BatchNorm statistics, a
    ``Linear`` after ``flatten`` (each channel's ``H*W`` features), depthwise/grouped convs (whole groups),
    residual adds and ``torch.cat``. The result is a deep copy of ``model`` with the affected modules
    replaced by smaller ones (weights sliced, so kept units compute exactly what they computed before, up to a
    ``LayerNorm`` over pruned features, which renormalises over the kept ones);
    module training flags are those of ``model``. With nothing removed the outputs equal ``model``'s.

    Raises:
        SurgeryError: unknown layer, bad indices, removing units that are pinned (the model output, units
            added to the model input, units entering an op surgery cannot adjust, naming that op and node),
            conflicting sets for tied layers, or a model torch.fx cannot trace.
        TypeError: ``keep`` is not a mapping of index iterables, or ``example_input`` is not a tensor.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(keep, Mapping):
        raise TypeError(f"keep must be a dict {{layer name: unit indices}}, got {type(keep).__name__}")
    work = copy.deepcopy(model)
    analysis = analyse(work, example_input)
    normalised: dict[str, np.ndarray] = {}
    for name, raw in keep.items():
        if name not in analysis.producers:
            raise layer_error(analysis, name)
        normalised[name] = _indices(raw, name, analysis.producers[name].units)
    removed = _decide(analysis, normalised)
    if not removed:
        return work
    modules = dict(work.named_modules())
    for name, plan in _plan(analysis, removed).items():
        _set_submodule(work, name, _replacement(name, modules[name], plan))
    if check:
        _check(work, example_input, analysis.output_shapes)
    return work


def _check(work: nn.Module, example_input, expected: list[tuple[int, ...]]) -> None:
    """Run the new model once (eval mode, no grad) and compare its output shapes with the original's."""
    flags = {name: m.training for name, m in work.named_modules()}
    inputs = (example_input,) if isinstance(example_input, torch.Tensor) else tuple(example_input)
    work.eval()
    try:
        with torch.no_grad():
            out = work(*inputs)
    except Exception as err:
        raise SurgeryError(
            f"the smaller model fails on example_input: {type(err).__name__}: {str(err).strip().splitlines()[-1]}; "
            f"its forward probably hard-codes a channel count (report the model so surgery can detect it)"
        ) from err
    finally:
        for name, m in work.named_modules():
            m.training = flags[name]
    shapes = [tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor)]
    if expected and shapes != expected:
        raise SurgeryError(
            f"the smaller model outputs shapes {shapes}, the original {expected}; surgery cannot apply this keep"
        )
