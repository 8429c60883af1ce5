"""``AnalyticsEngine``: fit sufficient rules on a layer's activations, locally and fast, with certified precision.

Usage as in seed 000::

    ae = AnalyticsEngine(features, {"predictions": preds})
    rule, out = ae.compute_linear_sufficient_rule("predictions", 3, fit_on_val=True)
    rules, out = ae.compute_linear_sufficient_rules("predictions")      # all classes, one RuleSet

With ``fit_on_val=True`` (the default) the samples are split once (seeded): the linear scorer is fitted
on the fit part and each threshold is chosen on the held-out part so that, with probability
``confidence``, the error rate among samples where the rule fires is at most ``max_error``
(Clopper-Pearson, Bonferroni over the candidate thresholds; see :mod:`moco.rules.threshold`). The scorer
is fitted once per column and reused for every class, so rules for ten classes cost one fit.
"""

from __future__ import annotations

import math
import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from moco.errors import MocoError
from moco.rules.report import RuleReport, warn_if_uncertified
from moco.rules.rule import KINDS, LinearRule, RuleSet
from moco.rules.scorer import LinearScorer, fit_linear_scorer, score_rows

__all__ = ["AnalyticsEngine"]
from moco.rules.threshold import ThresholdChoice, select_threshold


def _as_2d(features):
    if isinstance(features, torch.Tensor):
        features = features.detach()
        return features.reshape(features.shape[0], -1) if features.dim() != 2 else features
    if not isinstance(features, np.ndarray):
        raise TypeError(f"features must be a numpy array, memmap or torch tensor, not {type(features).__name__}")
    if features.ndim < 2:
        raise MocoError(f"features must be [N, D] (one row per sample), got shape {features.shape}")
    return features.reshape(features.shape[0], -1) if features.ndim != 2 else features


def _check_finite(features, chunk: int = 2048) -> None:
    for start in range(0, features.shape[0], chunk):
        block = features[start : start + chunk]
        finite = torch.isfinite(block).all() if isinstance(block, torch.Tensor) else np.isfinite(block).all()
        if not finite:
            raise MocoError(f"features contain NaN or inf (first in rows {start}..{start + chunk - 1}); "
                            "clean the activations before fitting rules")


class AnalyticsEngine:
    """Rules over ``features [N, D]`` (array, memmap or tensor) for named label ``columns``.

    Each column is ``[N]`` class indices or ``[N, K]`` scores (argmax is taken). ``val_fraction`` of
    the samples is held out for thresholds; ``epochs``, ``batch_size``, ``lr`` set the scorer fit;
    ``layer`` is recorded in the rules (the split point the features came from).
    """

    def __init__(
        self,
        features,
        columns: Mapping[str, Any],
        *,
        val_fraction: float = 0.25,
        epochs: int = 8,
        batch_size: int = 1024,
        lr: float = 3e-3,
        seed: int = 0,
        layer: int | str | None = None,
        progress: bool = True,
    ):
        self.features = _as_2d(features)
        self.columns = dict(columns)
        self.val_fraction = val_fraction
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.seed = seed
        self.layer = layer
        self.progress = progress
        n = self.features.shape[0]
        if n == 0:
            raise MocoError("features are empty (0 samples); capture the layer on some data first "
                            "(build_embeddings_and_predictions)")
        if not self.columns:
            raise MocoError("give at least one label column, e.g. {'predictions': preds}")
        if not 0.0 < val_fraction < 1.0:
            raise MocoError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self._labels: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name, col in self.columns.items():
            arr = col.detach().cpu().numpy() if isinstance(col, torch.Tensor) else np.asarray(col)
            if arr.shape[0] != n:
                raise MocoError(f"column {name!r} has {arr.shape[0]} rows but features have {n}; they must match")
            if arr.ndim == 2:
                if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)):
                    raise MocoError(f"column {name!r} has NaN or inf scores (or is not numeric); "
                                    "check the model's outputs before fitting rules")
                classes = np.arange(arr.shape[1])
                arr = arr.argmax(axis=1)
            elif arr.ndim == 1:
                if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
                    raise MocoError(f"column {name!r} must hold class indices (ints) or an [N, K] score matrix, "
                                    f"got {arr.dtype} values; map class names to indices first")
                if not np.issubdtype(arr.dtype, np.integer):
                    if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
                        raise MocoError(f"column {name!r} must hold class indices or an [N, K] score matrix")
                    arr = arr.astype(np.int64)
                classes = np.arange(int(arr.max()) + 1) if arr.size else np.arange(0)
            else:
                raise MocoError(f"column {name!r} must be [N] class indices or [N, K] scores, got shape {arr.shape}")
            if arr.size and arr.min() < 0:
                raise MocoError(f"column {name!r} has negative class indices")
            self._labels[name] = (arr.astype(np.int64), classes)
        rng = np.random.default_rng(seed)
        perm = rng.permutation(n)
        n_val = int(round(n * val_fraction))
        self.val_rows_ = np.sort(perm[:n_val])
        self.fit_rows_ = np.sort(perm[n_val:])
        self._scorers: dict[tuple[str, bool], LinearScorer] = {}
        self._raw_scores: dict[tuple[str, bool, str], np.ndarray] = {}
        self._checked = False

    # ------------------------------------------------------------------ internals
    def _column(self, column: str) -> tuple[np.ndarray, np.ndarray]:
        if column not in self._labels:
            raise MocoError(f"unknown column {column!r}; columns: {', '.join(self._labels)}")
        return self._labels[column]

    def scorer_(self, column: str, fit_on_val: bool = True) -> LinearScorer:
        """The linear scorer for ``column`` (fitted on first use, then cached)."""
        key = (column, fit_on_val)
        if key not in self._scorers:
            if not self._checked:
                _check_finite(self.features)
                self._checked = True
            labels, classes = self._column(column)
            rows = self.fit_rows_ if fit_on_val else np.arange(len(labels))
            self._scorers[key] = fit_linear_scorer(
                self.features, labels, rows, classes, epochs=self.epochs, batch_size=self.batch_size,
                lr=self.lr, seed=self.seed, progress=self.progress,
            )
        return self._scorers[key]

    def _check_values(self, column: str, values: Sequence[int]) -> None:
        labels, classes = self._column(column)
        counts = np.bincount(labels, minlength=len(classes))
        for v in values:
            if not (0 <= int(v) < len(classes)) or counts[int(v)] == 0:
                raise MocoError(f"no sample has {column} == {v}: a rule needs examples of its class "
                                f"(classes present: {np.flatnonzero(counts).tolist()})")

    @staticmethod
    def _margins(scores: np.ndarray) -> np.ndarray:
        top2 = -np.partition(-scores, 1, axis=1)[:, :2] if scores.shape[1] > 1 else None
        if top2 is None:
            return scores
        other = np.where(scores == top2[:, :1], top2[:, 1:2], top2[:, :1])
        return scores - other

    def _split_scores(self, column: str, fit_on_val: bool, kind: str):
        """Scorer, and per split ``(rule scores [n, K], labels [n], raw scores [n, K])``; raw scores are cached."""
        if kind not in KINDS:
            raise MocoError(f"kind must be one of {KINDS}, got {kind!r}")
        scorer = self.scorer_(column, fit_on_val)
        labels, _ = self._column(column)
        fit_rows = self.fit_rows_ if fit_on_val else np.arange(len(labels))
        val_rows = self.val_rows_ if fit_on_val else fit_rows
        out = {}
        for split, rows in (("fit", fit_rows), ("val", val_rows)):
            key = (column, fit_on_val, split)
            if key not in self._raw_scores:
                self._raw_scores[key] = score_rows(scorer, self.features, rows)
            s = self._raw_scores[key]
            out[split] = (self._margins(s) if kind == "margin" else s, labels[rows], s)
        return scorer, out

    @staticmethod
    def _report(choice: ThresholdChoice, fire_fit, wrong_fit, fire_val, wrong_val, n_fit, n_val) -> dict[str, Any]:
        def stats(fire, wrong, n):
            fired = int(fire.sum())
            return fired, int((fire & wrong).sum()), fired / max(n, 1)

        ff, ef, cf = stats(fire_fit, wrong_fit, n_fit)
        fv, ev, cv = stats(fire_val, wrong_val, n_val)
        return {
            "threshold": None if math.isinf(choice.threshold) else choice.threshold,
            "n_fit": n_fit, "fired_fit": ff, "errors_fit": ef, "coverage_fit": cf,
            "precision_fit": 1 - ef / ff if ff else None,
            "n_val": n_val, "fired_val": fv, "errors_val": ev, "coverage_val": cv,
            "precision_val": 1 - ev / fv if fv else None,
            "certified_precision": 1 - choice.error_bound if choice.fired else None,
            "certified": bool(choice.fired),
            "needed_samples": choice.needed,
        }

    # ------------------------------------------------------------------ public API
    def compute_linear_sufficient_rule(
        self,
        column: str,
        value: int,
        fit_on_val: bool = True,
        *,
        max_error: float = 0.005,
        confidence: float = 0.95,
        kind: str = "margin",
        grid: int = 200,
    ) -> tuple[LinearRule, dict[str, Any]]:
        """Fit the rule "the model predicts ``value``" with the largest coverage whose error among fired
        samples is certified <= ``max_error`` at ``confidence``; returns ``(rule, out)``.

        ``out`` reports coverage and precision on the fit and held-out splits, the certified precision
        and ``fit_seconds``. With ``fit_on_val=False`` the threshold is chosen on the training samples
        themselves, so the bound is optimistic and ``out["certified"]`` is False.

        The bound is certified on this class's own held-out firings only; with a few hundred held-out
        samples per class it can certify nothing where :meth:`compute_linear_sufficient_rules` (one bound
        over every class's firings together, so many more samples) certifies a set that fires on this
        class too. Prefer the set for a BranchedNetwork; use one class's rule when that class is the point.
        """
        t0 = time.perf_counter()
        value = int(value)
        self._check_values(column, [value])
        scorer, sc = self._split_scores(column, fit_on_val, kind)
        col = list(scorer.classes).index(value)
        s_val, y_val, _ = sc["val"]
        s_fit, y_fit, _ = sc["fit"]
        choice = select_threshold(s_val[:, col], y_val != value, s_fit[:, col], max_error=max_error,
                                  confidence=confidence, grid=grid, max_fraction=float((y_fit == value).mean()),
                                  what=f"samples of class {value}")
        out = self._report(choice, s_fit[:, col] > choice.threshold, y_fit != value,
                           s_val[:, col] > choice.threshold, y_val != value, len(y_fit), len(y_val))
        out.update({"class": value, "column": column, "kind": kind, "max_error": max_error, "confidence": confidence,
                    "fit_on_val": fit_on_val, "scorer_fit_seconds": scorer.fit_seconds,
                    "fit_seconds": time.perf_counter() - t0 + scorer.fit_seconds})
        if not fit_on_val:
            out["certified"] = False
        rule = LinearRule(scorer.weight, scorer.bias, tuple(int(c) for c in scorer.classes),
                          {value: choice.threshold}, kind=kind, layer=self.layer, info=out)
        report = RuleReport(out)
        if fit_on_val:
            warn_if_uncertified(report, self.layer, self.features.shape[0])
        return rule, report

    def compute_linear_sufficient_rules(
        self,
        column: str,
        values: Sequence[int] | None = None,
        fit_on_val: bool = True,
        *,
        max_error: float = 0.002,
        confidence: float = 0.95,
        kind: str = "margin",
        policy: str = "abstain",
        grid: int = 200,
    ) -> tuple[RuleSet, dict[str, Any]]:
        """Rules for many classes at once (default: every class present), as one :class:`RuleSet`.

        The certificate is for the whole set: among held-out samples where any rule fires, the error
        rate is <= ``max_error`` at ``confidence``. For ``kind="margin"`` one threshold on the top-class
        margin is shared by all rules (margins share the logit scale); for ``kind="linear"`` each rule's
        threshold is chosen on its own at ``max_error`` with confidence split across the rules.
        """
        t0 = time.perf_counter()
        labels, classes = self._column(column)
        if values is None:
            values = [int(c) for c in np.flatnonzero(np.bincount(labels, minlength=len(classes)))]
        values = [int(v) for v in values]
        if not values:
            raise MocoError(f"values is empty: name at least one class of column {column!r} to fit rules for "
                            "(or pass values=None for every class present)")
        self._check_values(column, values)
        scorer, sc = self._split_scores(column, fit_on_val, kind)
        class_list = [int(c) for c in scorer.classes]
        cols = np.array([class_list.index(v) for v in values])
        s_val, y_val, _ = sc["val"]
        s_fit, y_fit, _ = sc["fit"]
        per_class: dict[int, dict[str, Any]] = {}
        if kind == "margin":
            top_val = s_val.argmax(axis=1)
            in_set = np.isin(top_val, cols)
            margin_val = np.where(in_set, s_val.max(axis=1), -np.inf)
            wrong_val = scorer.classes[top_val] != y_val
            top_fit = s_fit.argmax(axis=1)
            margin_fit = np.where(np.isin(top_fit, cols), s_fit.max(axis=1), -np.inf)
            choice = select_threshold(margin_val, wrong_val, margin_fit, max_error=max_error, confidence=confidence,
                                      grid=grid, max_fraction=float(np.isin(y_fit, values).mean()), what="samples")
            # margins >= 0 keep the rules exclusive: at most one fires per sample
            thresholds = {v: max(choice.threshold, 0.0) for v in values}
            bound = choice.error_bound
        else:
            thresholds, bounds = {}, []
            for v, c in zip(values, cols):
                ch = select_threshold(s_val[:, c], y_val != v, s_fit[:, c], max_error=max_error,
                                      confidence=1 - (1 - confidence) / len(values), grid=grid,
                                      max_fraction=float((y_fit == v).mean()), what=f"samples of class {v}")
                thresholds[v] = ch.threshold
                bounds.append(ch.error_bound if ch.fired else 0.0)
            # every rule holds its bound simultaneously (confidence split across rules), so the set does too
            bound = max(bounds)
        rules = RuleSet(scorer.weight, scorer.bias, tuple(class_list), thresholds, kind=kind, policy=policy,
                        layer=self.layer)
        # one report for the set, measured with the set's own assign() (policy included)
        report: dict[str, Any] = {}
        for split in ("fit", "val"):
            _, y, raw = sc[split]
            mask_t, pred_t = rules.decide(torch.from_numpy(raw))
            mask, pred = mask_t.numpy(), pred_t.numpy()
            fired = int(mask.sum())
            errors = int((mask & (pred != y)).sum())
            report.update({f"n_{split}": len(y), f"fired_{split}": fired, f"errors_{split}": errors,
                           f"coverage_{split}": fired / max(len(y), 1),
                           f"precision_{split}": 1 - errors / fired if fired else None})
            for v in values:
                fired_v = mask & (pred == v)
                per_class.setdefault(v, {})[f"fired_{split}"] = int(fired_v.sum())
                per_class[v][f"errors_{split}"] = int((fired_v & (y != v)).sum())
        report.update({
            "classes": values, "column": column, "kind": kind, "policy": policy, "max_error": max_error,
            "confidence": confidence, "fit_on_val": fit_on_val, "certified": bool(fit_on_val and report["fired_val"]),
            "certified_precision": 1 - bound if report["fired_val"] else None,
            "thresholds": {str(v): (None if math.isinf(t) else t) for v, t in thresholds.items()},
            "per_class": {str(v): d for v, d in per_class.items()},
            "scorer_fit_seconds": scorer.fit_seconds,
            "fit_seconds": time.perf_counter() - t0 + scorer.fit_seconds,
        })
        rules = RuleSet(scorer.weight, scorer.bias, tuple(class_list), thresholds, kind=kind, policy=policy,
                        layer=self.layer, info=report)
        out = RuleReport(report)
        if fit_on_val:
            warn_if_uncertified(out, self.layer, self.features.shape[0])
        return rules, out

    def assign_rows(self, rules: RuleSet, rows: np.ndarray, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """``rules.assign`` over the given feature rows, in batches: ``(mask [n] bool, classes [n] int)``."""
        from moco.rules.scorer import rows_as_tensor

        masks, preds = [], []
        with torch.inference_mode():
            for start in range(0, len(rows), batch_size):
                m, p = rules.assign(rows_as_tensor(self.features, rows[start : start + batch_size]))
                masks.append(m.numpy())
                preds.append(p.numpy())
        if not masks:
            return np.zeros(0, bool), np.zeros(0, np.int64)
        return np.concatenate(masks), np.concatenate(preds)
