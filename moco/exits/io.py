"""Save and load the exits of a network without pickle: ``<stem>.json`` (points, head specs, criterion,
thresholds, versions, MACs) and ``<stem>.npz`` (the heads' tensors, read with ``allow_pickle=False``).

Only the heads are stored: the backbone is the user's model (save it with
:func:`moco.train.save_checkpoint` after joint training). :func:`load_exits` re-attaches the heads to
a model of the same architecture.
"""

from __future__ import annotations

import hashlib
import io
import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moco.errors import MocoError
from moco.exits.criteria import Criterion, get_criterion
from moco.exits.network import EarlyExitNetwork, attach_exits
from moco.io import read_json_document, write_bytes_atomic, write_json_atomic

__all__ = ["save_exits", "load_exits"]

FORMAT = "moco.exits"
VERSION = 1


def _paths(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".json", ".npz") else path
    return stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".npz")


def save_exits(net: EarlyExitNetwork, path: str | Path) -> tuple[Path, Path]:
    """Write ``net``'s heads and settings to ``<path>.json`` and ``<path>.npz`` atomically; returns both paths."""
    import moco

    if not isinstance(net, EarlyExitNetwork):
        raise TypeError(f"net must be an EarlyExitNetwork, not {type(net).__name__}")
    json_path, npz_path = _paths(path)
    state = {k: v.detach().cpu().numpy() for k, v in net.heads.state_dict().items()}
    buf = io.BytesIO()
    np.savez(buf, **state)
    blob = buf.getvalue()
    write_bytes_atomic(npz_path, blob)
    meta = {
        "format": FORMAT, "version": VERSION, "points": list(net.points), "head_specs": list(net.head_specs),
        "criterion": net.criterion.spec(), "thresholds": list(net.thresholds), "num_classes": net.num_classes,
        "input_shape": list(net.input_shape), "segment_macs": list(net.costs.segment_macs),
        "head_macs": list(net.costs.head_macs), "weights": npz_path.name,
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
        "moco": getattr(moco, "__version__", "unknown"), "torch": str(torch.__version__),
    }
    write_json_atomic(json_path, meta)
    return json_path, npz_path


_FIELDS = {"points": list, "head_specs": list, "criterion": dict, "thresholds": list, "num_classes": int,
           "input_shape": list}


def _validate(meta: dict, json_path: Path) -> None:
    """Required fields with the right types, and sane thresholds; MocoError naming the file otherwise."""
    for key, typ in _FIELDS.items():
        if key not in meta:
            raise MocoError(f"{json_path} lacks the field {key!r}; it is not a complete moco exits file: save the exits again")
        value = meta[key]
        if not isinstance(value, typ) or isinstance(value, bool):
            raise MocoError(f"{json_path}: field {key!r} must be a {typ.__name__}, got {type(value).__name__}; "
                            "the file was edited or damaged: save the exits again")
    if not all(isinstance(p, str) for p in meta["points"]) or not all(isinstance(h, dict) for h in meta["head_specs"]):
        raise MocoError(f"{json_path}: 'points' must be names and 'head_specs' objects; save the exits again")
    if len(meta["head_specs"]) != len(meta["points"]) or len(meta["thresholds"]) != len(meta["points"]):
        raise MocoError(f"{json_path}: {len(meta['points'])} points need as many head_specs and thresholds, got "
                        f"{len(meta['head_specs'])} and {len(meta['thresholds'])}; save the exits again")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in meta["input_shape"]):
        raise MocoError(f"{json_path}: input_shape must be positive ints, got {meta['input_shape']!r}")
    for i, t in enumerate(meta["thresholds"]):
        if t is None:
            continue
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or abs(t) > 1e6:
            raise MocoError(f"{json_path}: threshold {i} is {t!r}; a threshold must be a finite number of "
                            "reasonable size (or null to disable the exit): calibrate and save the exits again")


def load_exits(model: nn.Module, path: str | Path, *, head: Any = None,
               criterion: str | Criterion | None = None) -> EarlyExitNetwork:
    """Re-attach saved exits to ``model`` (same architecture as when saved); returns the network.

    ``head``: the factory for heads saved as ``"custom"`` (built-in heads are rebuilt from their spec);
    ``criterion``: an instance for a criterion that is not built in (default: the saved one).
    Raises MocoError for a missing or foreign file, or heads that do not fit the model.
    """
    json_path, npz_path = _paths(path)
    if not json_path.is_file() or not npz_path.is_file():
        raise MocoError(f"saved exits need both {json_path} and {npz_path}; save them with save_exits(net, path)")
    meta = read_json_document(json_path, format=FORMAT, version=VERSION, what="moco exits file")
    _validate(meta, json_path)
    specs = meta["head_specs"]
    heads: list[Any] = []
    for spec in specs:
        if spec.get("type") == "custom":
            if head is None:
                raise MocoError(f"the exits in {json_path} use a custom head ({spec.get('name')}); pass head=<factory>")
            heads.append(head)
        else:
            heads.append(spec)
    crit = criterion if criterion is not None else meta["criterion"]
    if criterion is None and meta["criterion"].get("name") not in ("entropy", "max_prob"):
        raise MocoError(f"the exits use the custom criterion {meta['criterion'].get('name')!r}; pass criterion=<instance>")
    net = attach_exits(model, meta["points"], example_input=torch.zeros(1, *meta["input_shape"]), head=heads,
                       criterion=get_criterion(crit))
    if net.num_classes != meta["num_classes"]:
        raise MocoError(f"the model has {net.num_classes} classes but the exits were saved for {meta['num_classes']}")
    blob = npz_path.read_bytes()
    if "weights_sha256" in meta and hashlib.sha256(blob).hexdigest() != meta["weights_sha256"]:
        raise MocoError(f"{npz_path} does not match the checksum in {json_path}; the pair was changed or mixed up: "
                        "save the exits again")
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as arrays:
            state = {k: torch.from_numpy(arrays[k].copy()) for k in arrays.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise MocoError(f"{npz_path} is not a readable npz of head weights ({type(exc).__name__}: {exc}); it is "
                        "truncated or damaged: save the exits again") from None
    try:
        net.heads.load_state_dict(state)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        detail = (lines[1:] or lines or [type(exc).__name__])[0]  # torch: a header line, then the details
        raise MocoError(f"the heads in {npz_path} do not fit this model ({detail.rstrip('.')}); load them onto the model "
                        "they were trained with") from None
    net.thresholds = meta["thresholds"]
    return net.eval()
