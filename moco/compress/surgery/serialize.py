"""Save a (smaller) model as JSON architecture + tensor-only weights, and rebuild it without pickle.

``save(model, "out/small")`` writes ``out/small.pt`` (``torch.save`` of a plain ``{name: tensor}``
state_dict, read back with ``torch.load(..., weights_only=True)``) and then ``out/small.json``, each
atomically. The JSON lists, for every ``Conv2d``/``Linear``/``BatchNorm``/``PReLU`` module, its type and
constructor arguments (the sizes after surgery) and how to build the base architecture:

* ``arch``: a model-zoo spec ``{"name": ..., "kwargs": {...}}`` when given to :func:`save`;
* ``spec``: a user's model spec ``{"model": "/abs/path/mynet.py:Net", "args": {...}}`` (moco's
  ``file.py:Name`` or ``package.module:Name``, as :func:`moco.specs.resolve_model` takes) when given;
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


def _same_class(recorded: str | None, model: nn.Module) -> bool:
    """The recorded class is the model's: the same qualified name, or the same class name where one side
    was imported from its file by moco (``moco_user_<file>_<hash>``) and the other by the user."""
    if recorded == _class_name(model):
        return True
    module, _, qualname = (recorded or "").rpartition(".")
    mine = type(model).__module__
    from_file = module.startswith("moco_user_") or mine.startswith("moco_user_")
    return from_file and qualname == type(model).__qualname__


def _name_and_args(value, name: str, args: str, what: str) -> dict:
    """``{name: str, args: dict of JSON values}`` checked and copied (TypeError naming ``what`` otherwise)."""
    if not isinstance(value, dict) or not isinstance(value.get(name), str) or not isinstance(value.get(args, {}), dict):
        raise TypeError(f"{what}, got {value!r}")
    out = {name: value[name], args: dict(value.get(args, {}))}
    try:
        json.dumps(out)
    except TypeError as err:
        raise TypeError(f"{what.split(' must')[0]} {args} must be JSON values: {err}") from None
    return out


def _check_spec(spec) -> dict | None:
    if spec is None:
        return None
    return _name_and_args(spec, "model", "args", "spec must be {'model': 'file.py:Name', 'args': dict}")


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
    arch = _name_and_args(arch, "name", "kwargs", "arch must be a zoo name or {'name': str, 'kwargs': dict}")
    base = create(arch["name"], **arch["kwargs"])
    if type(base) is not type(model):
        raise SurgeryError(
            f"arch {arch} builds a {type(base).__name__}, but the model is a {type(model).__name__}; "
            f"pass the zoo spec the model was created from"
        )
    return arch


def save(model: nn.Module, path: str | os.PathLike, *, arch: dict | str | None = None,
         spec: dict | None = None) -> Path:
    """Write ``PATH.pt`` (tensor-only state_dict) and ``PATH.json`` (architecture); returns the JSON path.

    ``arch`` is the model-zoo spec the original was built from (``{"name": "resnet18", "kwargs":
    {"width_multiplier": 0.25, "in_channels": 1}}`` or just ``"seed_cnn"``); with it (or for a plain
    ``nn.Sequential`` of standard layers) :func:`load` needs no ``base``. ``spec``: for a user's own
    architecture, the model spec that builds it (``{"model": "/abs/mynet.py:Net", "args": {"width": 16}}``;
    make file paths absolute with :func:`moco.specs.absolute_spec`), so :func:`load` needs no ``base``
    either. A ``.json``/``.pt`` suffix on ``path`` is dropped.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    stem = _stem(path)
    arch = _check_arch(arch, model)
    spec = _check_spec(spec)
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
        "spec": spec,
        "tree": _tree(model),
        "modules": modules,
        "training": bool(model.training),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "weights": weights.name,
    }
    with atomic_path(weights) as tmp:
        torch.save(state, tmp)
    return write_json_atomic(stem.with_name(stem.name + ".json"), desc)


_FIX = "re-save the model with moco.compress.surgery.save (the file was edited, truncated or not written by moco)"


def _bad(jpath: Path, what: str) -> SurgeryError:
    return SurgeryError(f"{jpath} is damaged: {what}; {_FIX}")


def _zoo_spec(value, jpath: Path, key: str) -> dict:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not isinstance(
        value.get("kwargs", {}), dict
    ):
        raise _bad(jpath, f"{key!r} must be {{'name': str, 'kwargs': dict}}, got {value!r:.200}")
    return value


def _checked(desc: dict, jpath: Path) -> dict:
    """``desc`` after checking every key :func:`load` reads has the type :func:`save` writes."""
    if not isinstance(desc.get("weights"), str) or not desc["weights"]:
        raise _bad(jpath, "key 'weights' (the name of the .pt file) is missing or not a string")
    if not isinstance(desc.get("modules", {}), dict):
        raise _bad(jpath, f"'modules' must be a dict {{name: {{'type', 'kwargs'}}}}, got {type(desc['modules']).__name__}")
    for name, spec in desc.get("modules", {}).items():
        if not isinstance(spec, dict) or not isinstance(spec.get("type"), str) or not isinstance(spec.get("kwargs"), dict):
            raise _bad(jpath, f"module entry {name!r} must be {{'type': str, 'kwargs': dict}}, got {spec!r:.200}")
    if desc.get("arch") is not None:
        _zoo_spec(desc["arch"], jpath, "arch")
    if desc.get("spec") is not None:
        try:
            _check_spec(desc["spec"])
        except TypeError as err:
            raise _bad(jpath, str(err)) from None
    if desc.get("tree") is not None and not isinstance(desc["tree"], dict):
        raise _bad(jpath, f"'tree' must be a dict, got {type(desc['tree']).__name__}")
    if not isinstance(desc.get("model_class", ""), str):
        raise _bad(jpath, "'model_class' must be a string")
    if not isinstance(desc.get("training", False), bool):
        raise _bad(jpath, "'training' must be true or false")
    return desc


def _build_tree_checked(tree: dict, jpath: Path) -> nn.Module:
    try:
        return _build_tree(tree)
    except SurgeryError as err:
        raise _bad(jpath, f"its 'tree' cannot be rebuilt ({err})") from None
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise _bad(jpath, f"its 'tree' is malformed ({type(err).__name__}: {err})") from None


def _base_model(desc: dict, base, jpath: Path) -> nn.Module:
    from moco.models import create

    if isinstance(base, nn.Module):
        return copy.deepcopy(base)
    if isinstance(base, str):
        arch = desc.get("arch") or {}
        return create(base, **(arch.get("kwargs", {}) if arch.get("name") == base else {}))
    if isinstance(base, dict):
        if not isinstance(base.get("name"), str) or not isinstance(base.get("kwargs", {}), dict):
            raise TypeError(f"base must be {{'name': str, 'kwargs': dict}}, got {base!r}")
        return create(base["name"], **base.get("kwargs", {}))
    if base is not None:
        raise TypeError(f"base must be an nn.Module, a zoo name or {{'name', 'kwargs'}}, got {type(base).__name__}")
    if desc.get("arch"):
        try:
            return create(desc["arch"]["name"], **desc["arch"].get("kwargs", {}))
        except (TypeError, ValueError, RuntimeError) as err:
            raise _bad(jpath, f"its arch {desc['arch']} does not build ({type(err).__name__}: {err})") from None
    if desc.get("spec"):
        from moco.errors import MocoError
        from moco.specs import resolve_model

        spec = desc["spec"]
        try:
            return resolve_model(spec["model"], args=spec.get("args", {}), base_dir=jpath.parent,
                                 require_weights=False, progress=False).model
        except MocoError as err:
            raise SurgeryError(f"{jpath} was saved from model spec {spec['model']!r}, which does not build here "
                               f"({err}); pass base= the original model") from None
    if desc.get("tree"):
        return _build_tree_checked(desc["tree"], jpath)
    raise SurgeryError(
        f"{jpath} records no zoo architecture for {desc.get('model_class')}; pass base= the original model "
        f"(or save with arch={{'name': ..., 'kwargs': ...}})"
    )


def load(path: str | os.PathLike, base: nn.Module | str | dict | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save` (``PATH``, ``PATH.json`` or ``PATH.pt``), without pickle.

    ``base`` is the original (unpruned) model or its zoo name/spec; it is copied, never modified. It may be
    omitted when the JSON records a zoo spec, a model spec (a user's ``file.py:Name``, as ``moco run``
    saves its models) or describes a plain ``nn.Sequential`` entirely. Weights load
    on the CPU with ``weights_only=True``; the model gets the saved training flag.

    A damaged pair of files (keys missing or of the wrong type, an ``arch`` that is not a zoo spec, a
    truncated or foreign ``.pt``, weights that do not fit) raises :class:`SurgeryError` naming the file
    and the fix, never a ``KeyError`` or a deep torch traceback.
    """
    stem = _stem(path)
    jpath = stem.with_name(stem.name + ".json")
    if not jpath.is_file():
        raise SurgeryError(f"no surgery description {jpath}; save the model with moco.compress.surgery.save first")
    desc = _checked(read_json_document(jpath, format=FORMAT, what=f"{FORMAT} description", error=SurgeryError), jpath)
    wpath = jpath.with_name(desc["weights"])
    if not wpath.is_file():
        raise SurgeryError(f"weights file {wpath} named by {jpath} does not exist")
    model = _base_model(desc, base, jpath)
    if not _same_class(desc.get("model_class"), model) and desc.get("tree") is None:
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
        try:
            new = build_module(spec)
        except SurgeryError as err:
            raise _bad(jpath, f"module {name!r}: {err}") from None
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    try:
        state = torch.load(wpath, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, random bytes, a pickle with non-tensor objects, ...
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise SurgeryError(
            f"cannot read weights {wpath} ({type(err).__name__}: {first}); the file is truncated, corrupt or not "
            f"written by moco.compress.surgery.save: re-save the model"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise SurgeryError(f"{wpath} does not hold a state_dict of tensors; {_FIX}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise SurgeryError(f"weights {wpath} do not fit the rebuilt model: {' '.join(first[:3])[:500]}") from None
    model.train(bool(desc.get("training", False)))
    return model
