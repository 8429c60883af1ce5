"""Save a (smaller) model as JSON architecture + tensor-only weights, and rebuild it without pickle.

``save(model, "out/small")`` writes ``out/small.pt`` (``torch.save`` of a plain ``{name: tensor}``
state_dict, read back with ``torch.load(..., weights_only=True)``) and then ``out/small.json``, each
atomically. The JSON lists, for every ``Conv2d``/``Linear``/``BatchNorm``/``PReLU`` module, its type and
constructor arguments (the sizes after surgery) and how to build the base architecture:

* ``arch``: a model-zoo spec ``{"name": ..., "kwargs": {...}}`` when given to :func:`save`;
* ``tree``: for a plain ``nn.Sequential`` of standard layers, the whole model (no base needed);
* otherwise :func:`load` needs ``base=`` (the original model, or a zoo name/spec).

``load`` builds the base, replaces every listed module by a fresh one of the recorded size, then loads
the weights strictly (every key present, every shape equal).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from torch import nn

from moco.compress.surgery.errors import SurgeryError
from moco.compress.surgery.modules import SIZED_TYPES, build_module, describe_module
from moco.io import atomic_path, read_json_document, write_json_atomic

__all__ = ["load", "save"]

FORMAT = "moco.surgery/1"


def _stem(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".json", ".pt") else path


def _class_name(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


def _tree(module: nn.Module) -> dict | None:
    """A JSON description of a whole plain Sequential of standard layers, or None."""
    if type(module) is nn.Sequential:
        children = []
        for name, child in module.named_children():
            desc = _tree(child)
            if desc is None:
                return None
            children.append({"name": name, **desc})
        return {"type": "Sequential", "children": children}
    return describe_module(module, plain=True)


def _build_tree(desc: dict) -> nn.Module:
    if desc.get("type") == "Sequential":
        seq = nn.Sequential()
        for child in desc.get("children", []):
            seq.add_module(str(child["name"]), _build_tree(child))
        return seq
    return build_module(desc)


def _check_arch(arch, model: nn.Module) -> dict | None:
    if arch is None:
        return None
    from moco.models import create

    if isinstance(arch, str):
        arch = {"name": arch, "kwargs": {}}
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str) or not isinstance(
        arch.get("kwargs", {}), dict
    ):
        raise TypeError(f"arch must be a zoo name or {{'name': str, 'kwargs': dict}}, got {arch!r}")
    arch = {"name": arch["name"], "kwargs": dict(arch.get("kwargs", {}))}
    try:
        json.dumps(arch)
    except TypeError as err:
        raise TypeError(f"arch kwargs must be JSON values: {err}") from None
    base = create(arch["name"], **arch["kwargs"])
    if type(base) is not type(model):
        raise SurgeryError(
            f"arch {arch} builds a {type(base).__name__}, but the model is a {type(model).__name__}; "
            f"pass the zoo spec the model was created from"
        )
    return arch


def save(model: nn.Module, path: str | os.PathLike, *, arch: dict | str | None = None) -> Path:
    """Write ``PATH.pt`` (tensor-only state_dict) and ``PATH.json`` (architecture); returns the JSON path.

    ``arch`` is the model-zoo spec the original was built from (``{"name": "resnet18", "kwargs":
    {"width_multiplier": 0.25, "in_channels": 1}}`` or just ``"seed_cnn"``); with it (or for a plain
    ``nn.Sequential`` of standard layers) :func:`load` needs no ``base``. A ``.json``/``.pt`` suffix on
    ``path`` is dropped.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    stem = _stem(path)
    arch = _check_arch(arch, model)
    state = {}
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise SurgeryError(
                f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor; cannot save it safely"
            )
        state[key] = value.detach().to("cpu").clone()
    modules = {name: describe_module(m) for name, m in model.named_modules() if describe_module(m) is not None}
    weights = stem.with_name(stem.name + ".pt")
    desc = {
        "format": FORMAT,
        "model_class": _class_name(model),
        "arch": arch,
        "tree": _tree(model),
        "modules": modules,
        "training": bool(model.training),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "weights": weights.name,
    }
    with atomic_path(weights) as tmp:
        torch.save(state, tmp)
    return write_json_atomic(stem.with_name(stem.name + ".json"), desc)


def _base_model(desc: dict, base, jpath: Path) -> nn.Module:
    from moco.models import create

    if isinstance(base, nn.Module):
        return copy.deepcopy(base)
    if isinstance(base, str):
        arch = desc.get("arch") or {}
        return create(base, **(arch.get("kwargs", {}) if arch.get("name") == base else {}))
    if isinstance(base, dict):
        return create(base["name"], **base.get("kwargs", {}))
    if base is not None:
        raise TypeError(f"base must be an nn.Module, a zoo name or {{'name', 'kwargs'}}, got {type(base).__name__}")
    if desc.get("arch"):
        return create(desc["arch"]["name"], **desc["arch"].get("kwargs", {}))
    if desc.get("tree"):
        return _build_tree(desc["tree"])
    raise SurgeryError(
        f"{jpath} records no zoo architecture for {desc.get('model_class')}; pass base= the original model "
        f"(or save with arch={{'name': ..., 'kwargs': ...}})"
    )


def load(path: str | os.PathLike, base: nn.Module | str | dict | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save` (``PATH``, ``PATH.json`` or ``PATH.pt``), without pickle.

    ``base`` is the original (unpruned) model or its zoo name/spec; it is copied, never modified. It may be
    omitted when the JSON records a zoo spec or describes a plain ``nn.Sequential`` entirely. Weights load
    on the CPU with ``weights_only=True``; the model gets the saved training flag.
    """
    stem = _stem(path)
    jpath = stem.with_name(stem.name + ".json")
    if not jpath.is_file():
        raise SurgeryError(f"no surgery description {jpath}; save the model with moco.compress.surgery.save first")
    desc = read_json_document(jpath, format=FORMAT, what=f"{FORMAT} description", error=SurgeryError)
    wpath = jpath.with_name(str(desc.get("weights", "")))
    if not wpath.is_file():
        raise SurgeryError(f"weights file {wpath} named by {jpath} does not exist")
    model = _base_model(desc, base, jpath)
    if _class_name(model) != desc.get("model_class") and desc.get("tree") is None:
        raise SurgeryError(
            f"{jpath} holds a {desc.get('model_class')}, but base is a {_class_name(model)}; "
            f"pass the original architecture"
        )
    for name, spec in desc.get("modules", {}).items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise SurgeryError(
                f"{jpath} resizes module {name!r}, which the base model does not have; wrong base?"
            ) from None
        if spec.get("type") not in SIZED_TYPES or type(old) is not SIZED_TYPES[spec["type"]][0]:
            raise SurgeryError(
                f"module {name!r} is a {type(old).__name__} in the base model but {spec.get('type')} in {jpath}"
            )
        new = build_module(spec)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    try:
        state = torch.load(wpath, map_location="cpu", weights_only=True)
    except Exception as err:
        raise SurgeryError(f"cannot read weights {wpath}: {type(err).__name__}: {err}") from err
    if not isinstance(state, dict):
        raise SurgeryError(f"{wpath} does not hold a state_dict")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise SurgeryError(f"weights {wpath} do not fit the rebuilt model: {' '.join(first[:3])[:500]}") from None
    model.train(bool(desc.get("training", False)))
    return model


