"""What a ``moco run`` step hands to the next: a :class:`Stage` (the current model in one of four forms)
and the :class:`RunContext` every step reads (original model, data splits, example input, seed).

Forms (``Stage.kind``):

* ``"model"``: a plain ``nn.Module`` returning logits (the original, a pruned or a PFA model);
* ``"exits"``: an :class:`~moco.exits.EarlyExitNetwork`, ``net(x) -> (logits, exit_index)``;
* ``"rules"``: a :class:`~moco.rules.BranchedNetwork`, ``net(x) -> (predictions, mask)``;
* ``"deployed"``: a runtime from :func:`moco.deploy.load` with the same call contract, on numpy.

:meth:`Stage.predict` gives class labels for every form, :meth:`Stage.expected_macs` the MACs per
sample (counted by the profiler; for exits and rules the expectation over the exits taken on the data).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moco.errors import MocoError
from moco.specs import Data, ResolvedModel

__all__ = ["KINDS", "RunContext", "Stage"]

KINDS = ("model", "exits", "rules", "deployed")


@dataclass
class RunContext:
    """Everything a step reads: the ``original`` model (never modified), the training data split into
    ``fit`` (training) and ``holdout`` (validation / calibration; a seeded part of ``train``), ``test``,
    one ``example`` input ``[1, C, H, W]``, the ``seed``, ``progress``, the zoo ``arch`` (or None),
    ``timing`` and a user's ``model_spec``."""

    resolved: ResolvedModel
    original: nn.Module
    train: Data
    fit: Data
    holdout: Data
    test: Data
    example: torch.Tensor
    seed: int = 0
    progress: bool = False
    arch: dict | None = None
    out: Path | None = None
    timing: bool = True  # False with measure.timing = false / --no-timing: no step times anything either
    model_spec: dict | None = None  # a user's model: {"model": absolute spec, "args"} (saved models rebuild from it)

    def batch(self, n: int) -> torch.Tensor:
        """The first ``n`` test images, a real input batch."""
        return self.test.x[:n]


@dataclass
class Stage:
    """The current result of a run: ``kind`` (one of :data:`KINDS`), the object, and ``model``: the
    plain model under it (what compression steps act on; the backbone of exits and rules)."""

    kind: str
    obj: Any
    model: nn.Module | None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise MocoError(f"stage kind must be one of {KINDS}, got {self.kind!r}")

    def require_model(self, method: str) -> nn.Module:
        """The plain model, or a MocoError saying which step order works."""
        if self.kind != "model" or self.model is None:
            raise MocoError(f"step {method!r} transforms a plain model, but the previous step produced "
                            f"{self.kind} ({type(self.obj).__name__}); put {method!r} before exits, rules and export")
        return self.model

    def __call__(self, x: torch.Tensor) -> Any:
        """One forward pass of the current object (what timing measures)."""
        if self.kind == "deployed":
            return self.obj(x.numpy())
        return self.obj(x)

    @torch.inference_mode()
    def predict(self, x: torch.Tensor, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray | None]:
        """``(labels [N], exit [N] or None)``: predicted classes and, for exits/rules, where each sample left
        (exits: the exit index; rules: 0 = the rule fired, 1 = the rest of the model ran)."""
        was = None
        if isinstance(self.obj, nn.Module):
            was = self.obj.training
            self.obj.eval()
        labels, where = [], []
        try:
            for start in range(0, len(x), batch_size):
                xb = x[start:start + batch_size]
                out = self(xb)
                if isinstance(out, tuple):
                    first, second = out
                    first, second = np.asarray(_numpy(first)), np.asarray(_numpy(second))
                    lab = first.argmax(1) if first.ndim == 2 else first
                    if self.kind == "rules" or second.dtype == bool:
                        second = (~second.astype(bool)).astype(np.int64)  # mask True = exited at the rule
                    labels.append(lab.astype(np.int64))
                    where.append(second.astype(np.int64))
                else:
                    labels.append(np.asarray(_numpy(out)).argmax(1).astype(np.int64))
        finally:
            if was is not None:
                self.obj.train(was)
        return np.concatenate(labels), (np.concatenate(where) if where else None)

    def expected_macs(self, where: np.ndarray | None, example: torch.Tensor) -> float:
        """MACs per sample: the profiler's count for a plain model; for exits and rules the mean over the
        samples of the MACs of the path each took (``where`` from :meth:`predict`)."""
        from moco.profile import profile

        if self.info.get("macs") is not None and where is None:  # a simulation whose counted ops are not its MACs
            return float(self.info["macs"])
        if self.kind == "model" or (self.kind == "deployed" and where is None):
            model = self.model if self.model is not None else self.obj
            if not isinstance(model, nn.Module):
                return float(self.info.get("macs", float("nan")))
            return float(profile(model, example[:1], latency=False).totals.macs)
        costs = self.info.get("path_macs")
        if costs is None or where is None:
            return float("nan")
        counts = np.bincount(where, minlength=len(costs))[: len(costs)]
        return float(np.dot(counts, costs) / max(len(where), 1))


def _numpy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return value
