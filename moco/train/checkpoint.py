"""moco checkpoints: a model's weights (plus optimizer state and plain-JSON meta) written atomically and
read back with ``torch.load(..., weights_only=True)`` only: nothing of the user's is ever unpickled."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moco.errors import CheckpointError, MocoError
from moco.io import atomic_path

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT = "moco.checkpoint"
CHECKPOINT_VERSION = 1


def _to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor inside (dicts, lists, tuples) on the CPU (no copy for CPU tensors)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def save_checkpoint(
    model: nn.Module,
    path: str | Path,
    *,
    arch: dict | None = None,
    meta: dict | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Save ``model``'s weights atomically to ``path`` as a moco checkpoint.

    ``arch = {"name": <zoo name>, "kwargs": {...}}`` lets :func:`load_checkpoint` rebuild the model
    without the caller's code. Everything stored is tensors (moved to the CPU, so a checkpoint written
    while training on a GPU loads anywhere) and plain Python values, so it loads with
    ``torch.load(..., weights_only=True)`` (no pickle of user objects).
    """
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "arch": json.loads(json.dumps(dict(arch), default=str)) if arch else None,
        # plain JSON types only, so the file loads with weights_only=True (e.g. torch.__version__ is a
        # TorchVersion object that the safe unpickler refuses)
        "meta": json.loads(json.dumps(dict(meta or {}), default=str)),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if optimizer is not None:
        payload["optimizer"] = _to_cpu(optimizer.state_dict())
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def _read_checkpoint(path: str | Path) -> dict:
    from moco.io import read_torch_file

    path = Path(path)
    state = read_torch_file(path, what="checkpoint", error=CheckpointError)
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        if state.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(f"checkpoint {path} has version {state.get('version')}; this moco reads {CHECKPOINT_VERSION}")
        return state
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "arch": None, "meta": {}, "state_dict": state}
    raise CheckpointError(f"{path} is neither a moco checkpoint nor a state_dict")


def load_checkpoint(path: str | Path, model: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """Load a checkpoint with ``weights_only=True``; returns ``(model in eval mode, meta)``.

    Pass ``model`` to load a plain state_dict (or a moco checkpoint) into your own architecture;
    otherwise the checkpoint must name a zoo architecture (``arch``), which is rebuilt.
    """
    from moco.models import create

    state = _read_checkpoint(path)
    if model is None:
        arch = state.get("arch")
        if not arch:
            raise CheckpointError(f"checkpoint {path} does not name its architecture; pass model= to load it into yours")
        if not isinstance(arch, dict) or not isinstance(arch.get("name"), str):
            raise CheckpointError(f"checkpoint {path} has an arch that is not {{'name': <zoo model>, 'kwargs': {{...}}}} "
                                  f"(got {type(arch).__name__}); pass model= to load it into your architecture")
        kwargs = arch.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise CheckpointError(f"checkpoint {path}: arch kwargs must be a dict, got {type(kwargs).__name__}")
        try:
            model = create(arch["name"], **kwargs)
        except (TypeError, MocoError) as exc:
            raise CheckpointError(f"checkpoint {path} names an architecture moco cannot build: {exc}") from None
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {path} does not fit the model: {first}") from None
    meta = dict(state.get("meta", {}))
    meta["arch"] = state.get("arch")
    return model.eval(), meta
