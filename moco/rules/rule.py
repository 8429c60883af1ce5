"""Rules: linear scorers with firing thresholds that say "the model will predict class c here".

A :class:`RuleSet` holds one weight matrix ``W [D, K]``, bias ``b [K]`` and a threshold per rule class.
Scores ``s = x @ W + b`` come from one matrix multiply. Two kinds of rule:

- ``"margin"`` (default): rule c fires where ``s_c - max_{j != c} s_j > t_c`` (an intersection of
  K-1 half-spaces). With thresholds >= 0 at most one rule can fire on a sample, so rule sets never
  conflict.
- ``"linear"``: rule c fires where ``s_c > t_c`` (one half-space). Where several fire, ``policy``
  decides: ``"abstain"`` (the sample does not exit; the safe default) or ``"max_score"`` (the rule whose
  score exceeds its threshold the most).

Rules save as JSON (metadata, thresholds) plus ``.npz`` (weights): no pickle.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moco.errors import MocoError
from moco.io import read_json_document, write_bytes_atomic, write_json_atomic

__all__ = ["KINDS", "LinearRule", "RuleSet", "load_rule", "load_rules"]

RULES_FORMAT = "moco.rules"
# version 2 adds "decision_sha256": a checksum of the fields that decide where a sample exits (classes,
# thresholds, bias, kind, policy, layer), so an edited threshold is caught like an edited weight file
RULES_VERSION = 2
_DECISION_FIELDS = ("classes", "thresholds", "bias", "kind", "policy", "layer", "n_features")


def _decision_digest(meta: dict[str, Any]) -> str:
    import json

    return hashlib.sha256(json.dumps({k: meta.get(k) for k in _DECISION_FIELDS}, sort_keys=True).encode()).hexdigest()
KINDS = ("margin", "linear")
POLICIES = ("abstain", "max_score")


def _as_features(x, n_features: int) -> tuple[torch.Tensor, bool]:
    is_numpy = not isinstance(x, torch.Tensor)
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) if is_numpy else x
    if t.dim() > 2:
        t = t.reshape(t.shape[0], -1)
    if t.dim() != 2 or t.shape[1] != n_features:
        raise MocoError(f"the rule expects features [N, {n_features}], got shape {tuple(t.shape)}; "
                        "pass the (flattened) output of the layer the rule was fitted on")
    return t.float(), is_numpy


@dataclass(frozen=True, eq=False)
class RuleSet:
    """Rules for ``rule_classes`` over one linear scorer; see the module docstring for the semantics."""

    weight: np.ndarray  # [D, K] float32
    bias: np.ndarray  # [K] float32
    classes: tuple[int, ...]  # label of each score column
    thresholds: dict[int, float]  # rule class -> threshold (inf: never fires)
    kind: str = "margin"
    policy: str = "abstain"
    layer: int | str | None = None
    info: dict[str, Any] = field(default_factory=dict)  # fitting record: counts, precisions, bounds

    def __post_init__(self):
        if self.kind not in KINDS:
            raise MocoError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.policy not in POLICIES:
            raise MocoError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        w, b = np.asarray(self.weight), np.asarray(self.bias)
        if w.ndim != 2 or b.shape != (w.shape[1],) or len(self.classes) != w.shape[1]:
            raise MocoError(f"inconsistent rule shapes: weight {w.shape}, bias {b.shape}, {len(self.classes)} classes")
        unknown = [c for c in self.thresholds if c not in self.classes]
        if unknown:
            raise MocoError(f"rule classes {unknown} are not among the scorer's classes {list(self.classes)}")
        # stored as W^T [K, D], row-major: F.linear reads it about 1.7x faster than addmm with W [D, K]
        # for K = 10 columns (24.9 -> 14.2 ms for a batch of 1000 x 21,632 on the 2-core CI machine)
        object.__setattr__(self, "_wt", torch.from_numpy(np.ascontiguousarray(w.T, dtype=np.float32)))
        object.__setattr__(self, "_b", torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32)))
        cols = [self.classes.index(c) for c in self.rule_classes]
        thr = torch.full((len(self.classes),), math.inf)
        for c in self.rule_classes:
            thr[self.classes.index(c)] = float(self.thresholds[c])
        object.__setattr__(self, "_thr", thr)
        object.__setattr__(self, "_cols", torch.tensor(cols, dtype=torch.long))
        object.__setattr__(self, "_class_values", torch.tensor(self.classes, dtype=torch.long))

    # ------------------------------------------------------------------ properties
    @property
    def rule_classes(self) -> tuple[int, ...]:
        """Classes that have a rule, in score-column order."""
        return tuple(c for c in self.classes if c in self.thresholds)

    @property
    def n_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def num_classes(self) -> int:
        """Width of the model output the rules stand in for (classes are 0..num_classes-1)."""
        return int(max(self.classes)) + 1

    @property
    def macs_per_sample(self) -> int:
        """Cost of evaluating the rules on one sample: ``D * K`` multiply-accumulates."""
        return int(self.weight.shape[0] * self.weight.shape[1])

    # ------------------------------------------------------------------ evaluation
    def raw_scores(self, x) -> torch.Tensor:
        """The linear scorer's outputs ``x @ W + b`` ``[N, K]``."""
        feats, _ = _as_features(x, self.n_features)
        return torch.nn.functional.linear(feats, self._wt, self._b)

    def rule_scores(self, raw: torch.Tensor) -> torch.Tensor:
        """Per-class rule scores ``[N, K]`` from raw scorer outputs: margins or the raw scores, by ``kind``."""
        if self.kind == "linear" or raw.shape[1] == 1:
            return raw
        top2 = raw.topk(2, dim=1).values
        best_other = torch.where(raw == top2[:, :1], top2[:, 1:2], top2[:, :1])
        return raw - best_other

    def scores(self, x) -> torch.Tensor:
        """Per-class rule scores ``[N, K]`` (margins or raw scores by ``kind``); compare with thresholds."""
        return self.rule_scores(self.raw_scores(x))

    def fires(self, x):
        """Boolean ``[N, n_rules]`` (columns in ``rule_classes`` order): where each rule fires."""
        feats, is_numpy = _as_features(x, self.n_features)
        out = (self.scores(feats) > self._thr)[:, self._cols]
        return out.numpy() if is_numpy else out

    def decide(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mask, classes)`` from raw scorer outputs ``[N, K]`` (see :meth:`assign`)."""
        excess = self.rule_scores(raw) - self._thr  # > 0 where a rule fires
        n_fired = (excess > 0).sum(dim=1)
        mask = n_fired == 1 if self.policy == "abstain" else n_fired >= 1
        return mask, self._class_values[excess.argmax(dim=1)]

    def assign(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mask [N] bool, classes [N] long)``: which samples exit and with which class.

        ``classes`` is defined where ``mask`` is True. This is what ``BranchedNetwork`` calls per batch:
        one matrix multiply ``[N, D] x [D, K]`` plus a top-2 over K.
        """
        return self.decide(self.raw_scores(x))

    # ------------------------------------------------------------------ persistence
    @property
    def metadata(self) -> dict[str, Any]:
        """JSON-able description (everything but the weight matrix): kind, layer, classes, thresholds,
        bias, and ``info`` with the fitted counts and the measured and certified precisions."""
        return {
            "format": RULES_FORMAT,
            "version": RULES_VERSION,
            "type": type(self).__name__,
            "kind": self.kind,
            "policy": self.policy,
            "layer": self.layer,
            "n_features": self.n_features,
            "classes": list(self.classes),
            "thresholds": {str(c): (None if math.isinf(t) else float(t)) for c, t in self.thresholds.items()},
            "bias": [float(v) for v in self.bias],
            # the weight matrix itself lives in the .npz written by save(); this identifies it
            "weights": {"shape": list(np.asarray(self.weight).shape),
                        "digest": hashlib.sha256(np.ascontiguousarray(self.weight, dtype=np.float32).tobytes()).hexdigest()},
            "info": self.info,
        }

    def save(self, path: str | Path) -> Path:
        """Write ``PATH.json`` (metadata) and ``PATH.npz`` (weights), each atomically; returns the JSON path."""
        path = Path(path)
        base = path.with_suffix("") if path.suffix in (".json", ".npz") else path
        buf = io.BytesIO()
        np.savez(buf, weight=np.asarray(self.weight, dtype=np.float32), bias=np.asarray(self.bias, dtype=np.float32))
        blob = buf.getvalue()
        npz = base.with_name(base.name + ".npz")
        write_bytes_atomic(npz, blob)
        meta = self.metadata
        meta["weights"].update({"file": npz.name, "sha256": hashlib.sha256(blob).hexdigest()})
        meta["decision_sha256"] = _decision_digest(meta)
        return write_json_atomic(base.with_name(base.name + ".json"), meta)


@dataclass(frozen=True, eq=False)
class LinearRule(RuleSet):
    """One sufficient rule: where it fires, the model predicts ``class_`` (seed 000's ``rule``)."""

    @property
    def class_(self) -> int:
        (c,) = self.rule_classes
        return c

    @property
    def threshold(self) -> float:
        return float(self.thresholds[self.class_])

    def decision_function_(self, x):
        """Rule score per sample ``[N]`` (fires where ``> threshold``); numpy in, numpy out."""
        feats, is_numpy = _as_features(x, self.n_features)
        s = self.scores(feats)[:, self.classes.index(self.class_)]
        return s.numpy() if is_numpy else s

    def fires(self, x):
        """Boolean mask ``[N]``: where the rule fires."""
        out = super().fires(x)
        return out[:, 0]

    @property
    def metadata(self) -> dict[str, Any]:  # type: ignore[override]
        """JSON-able description: class, threshold, layer, bias, fitted counts, precisions (seed 000's ``rule.metadata``)."""
        meta = RuleSet.metadata.fget(self)
        meta["class"] = self.class_
        meta["threshold"] = meta["thresholds"][str(self.class_)]
        return meta


def load_rules(path: str | Path) -> RuleSet:
    """Load a rule or rule set saved by ``save`` (``PATH``, ``PATH.json`` or ``PATH.npz``), validating it."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_rule(s) takes the path a rule was saved to with rule.save(path), not "
                        f"{type(path).__name__} {path!r}; for one rule per class save each as e.g. "
                        f"rule.save(f'rule_{{c}}') and load it with load_rule(f'rule_{{c}}')")
    path = Path(path)
    base = path.with_suffix("") if path.suffix in (".json", ".npz") else path
    jpath = base.with_name(base.name + ".json")
    if not jpath.is_file():
        raise MocoError(f"rule file {jpath} does not exist")
    meta = read_json_document(jpath, format=RULES_FORMAT, what="moco rule file")
    if meta.get("version") not in (1, RULES_VERSION):
        raise MocoError(f"{jpath} has moco rule file version {meta.get('version')}; this moco reads 1 and {RULES_VERSION}")
    if meta.get("version") == RULES_VERSION and meta.get("decision_sha256") != _decision_digest(meta):
        raise MocoError(f"{jpath}: its classes, thresholds or bias do not match the file's checksum; the file was "
                        "edited or damaged: fit and save the rules again")
    try:
        weights_meta = meta["weights"]
        npz = jpath.with_name(weights_meta["file"])
        sha, shape, n_features = weights_meta["sha256"], weights_meta["shape"], meta["n_features"]
        raw_thresholds, classes, kind, policy = meta["thresholds"], meta["classes"], meta["kind"], meta["policy"]
    except (KeyError, TypeError) as exc:
        raise MocoError(f"{jpath} lacks the field {exc} (or it is malformed); it is not a complete moco rule "
                        "file: save the rule again") from None
    if not npz.is_file():
        raise MocoError(f"weights file {npz} named by {jpath} does not exist")
    blob = npz.read_bytes()
    if hashlib.sha256(blob).hexdigest() != sha:
        raise MocoError(f"{npz} does not match the checksum in {jpath}; the pair was changed or mixed up")
    import zipfile

    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as data:
            weight, bias = data["weight"], data["bias"]
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as exc:
        raise MocoError(f"{npz} is not a readable moco rule weights file ({type(exc).__name__}); save the rules "
                        "again") from None
    if list(weight.shape) != shape or weight.ndim != 2 or weight.shape[0] != n_features:
        raise MocoError(f"{npz} holds weights of shape {weight.shape}, {jpath} promises {shape}")
    if not isinstance(classes, list) or len(classes) != weight.shape[1] or len(bias) != weight.shape[1]:
        raise MocoError(f"{jpath}: classes, bias and weights disagree on the number of classes")
    if not np.all(np.isfinite(weight)) or not np.all(np.isfinite(bias)):
        raise MocoError(f"{npz} holds NaN or inf weights; fit and save the rules again")
    if not isinstance(raw_thresholds, dict):
        raise MocoError(f"{jpath}: thresholds must be a table of class -> number")
    thresholds = {}
    for c, t in raw_thresholds.items():
        try:
            key = int(c)
        except (TypeError, ValueError):
            raise MocoError(f"{jpath}: threshold key {c!r} is not a class index") from None
        if key not in classes:
            raise MocoError(f"{jpath}: a threshold for class {key}, which is not among the rule classes {classes}")
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)):
            raise MocoError(f"{jpath}: the threshold of class {key} is {t!r}; thresholds are finite numbers "
                            "(or null for a rule that never fires)")
        if t is not None and kind == "margin" and t < 0:
            raise MocoError(f"{jpath}: the margin threshold of class {key} is {t} < 0; margins thresholds are >= 0")
        thresholds[key] = math.inf if t is None else float(t)
    cls = LinearRule if meta.get("type") == "LinearRule" else RuleSet
    return cls(weight, bias, tuple(int(c) for c in classes), thresholds, kind=kind,
               policy=policy, layer=meta.get("layer"), info=meta.get("info", {}))


def load_rule(path: str | Path) -> LinearRule:
    """Load one rule saved with ``rule.save(path)``."""
    rules = load_rules(path)
    if not isinstance(rules, LinearRule):
        raise MocoError(f"{path} holds a rule set of {len(rules.rule_classes)} rules; use load_rules")
    return rules
