"""An accuracy-targeted PFA loop: apply a recipe in growing fractions of its reduction, fine-tune after each
step, and stop at the last step whose validation drop stays within budget.

Surgery plus a short fine-tune can lose much more than expected on a BatchNorm + residual model (a
user's model went from 78.6% to 63.8% with no warning). :class:`PFALoop` makes the budget explicit:

1. introspect the model (or take a given :class:`PFA`) and compute the recipe (default KL + L1Max);
   layers tied by a residual add / depthwise conv keep only one recipe per dependency group (the first
   layer of the group that has one), so that surgery gets consistent indices;
2. for each fraction ``f`` of ``fractions`` (default 0.25, 0.5, 0.75, 1.0), every layer keeps
   ``n - round(f * (n - k))`` units (``k``: the recipe's count), chosen by the unit strategy on the
   layer's covariance, and the *original* model is cut to that size (:func:`moco.compress.surgery.apply`),
   fine-tuned on a fresh random subset of the training data and evaluated on ``val_data``;
3. a step is accepted while the drop against the original model is at most ``max_drop`` (accuracy
   points as a fraction, 0.01 = 1 point, or the increase in mean cross-entropy with
   ``metric="loss"``); the first step over budget ends the loop and the last accepted model is kept
   (roll back). If even the first step is over budget, ``small_`` is an unchanged copy of the model and
   ``fraction_`` is 0.

Every step starts from the original weights, so a rolled-back step costs nothing but its time. The
caller's model is never modified. Units: accuracies are fractions, losses nats per sample, MACs
multiply-accumulates per sample, seconds wall-clock.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from moco.errors import MocoError

__all__ = ["PFALoop", "PFAStep", "check_round_to", "leader_recipes", "partial_keep", "rounded_count"]


@dataclass(frozen=True)
class PFAStep:
    """One step of :class:`PFALoop`: the model cut to ``fraction`` of the recipe's reduction, fine-tuned.

    ``units``: kept units per analysed layer; ``macs``: MACs per sample of the cut model; ``accuracy`` /
    ``loss``: validation accuracy (fraction) and mean cross-entropy after fine-tuning; ``drop``: the
    drop against the original model in the loop's metric (accuracy fraction, or loss increase);
    ``accepted``: within ``max_drop``; ``seconds``: wall-clock time of the step.
    """

    fraction: float
    units: dict
    macs: int
    accuracy: float
    loss: float
    drop: float
    accepted: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the fields."""
        return asdict(self)


def leader_recipes(recipes, model: nn.Module, example_input) -> tuple[dict, list[str]]:
    """The recipes surgery can apply together: one per prunable dependency group, the rest dropped.

    Layers tied by a residual add or a depthwise conv (:func:`moco.compress.surgery.dependency_groups`)
    must keep the same units, so only the first layer of each group that has a recipe keeps it (the
    others follow it in surgery); recipes of unprunable groups (the output layer) are dropped too.
    Returns ``({layer: recipe}, [dropped layer names])``.
    """
    from moco.compress.surgery import dependency_groups

    groups = {name: g for g in dependency_groups(model, example_input) for name in g.layers}
    chosen, dropped, seen = {}, [], set()
    for name, recipe in recipes.items():
        group = groups.get(name)
        if group is None:
            raise MocoError(f"PFA layer {name!r} is not a Conv2d/Linear of the model; name layers by the conv or "
                            f"linear that owns the units (PFA.introspect(..., layers=[...]))")
        if not group.prunable or group.layers in seen:
            dropped.append(name)
            continue
        seen.add(group.layers)
        chosen[name] = recipe
    if not chosen:
        raise MocoError("no PFA recipe applies to a prunable layer (the output layer and layers tied to it cannot "
                        "shrink)")
    return chosen, dropped


def check_round_to(round_to: Any) -> int | None:
    """``round_to`` checked: None (no rounding), an int >= 1, or ``"auto"``: ONNX Runtime's NCHWc
    channel block on this CPU (:func:`moco.profile.nchwc_block_size`: 16 with AVX-512, else 8)."""
    if isinstance(round_to, str) and round_to.strip().lower() == "auto":
        from moco.profile.hardware import nchwc_block_size

        return nchwc_block_size()
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, (int, np.integer))
                                 or round_to < 1):
        raise MocoError(f"round_to must be None, an int >= 1 or 'auto' (ONNX Runtime's channel block on this CPU: "
                        f"8 on AVX2, 16 on AVX-512), got {round_to!r}")
    return None if round_to is None else int(round_to)


def rounded_count(count: int, n: int, round_to: int | None) -> int:
    """``count`` of ``n`` units rounded to the nearest multiple of ``round_to`` (at least ``round_to``,
    at most ``n``; a layer of at most ``round_to`` units is left whole)."""
    if not round_to:
        return count
    return min(n, max(round_to, int(round(count / round_to)) * round_to))


def partial_keep(recipes, pfa, fraction: float, unit_strategy: Any = None, *, round_to: int | str | None = None
                 ) -> dict[str, list[int]]:
    """``{layer: sorted kept unit indices}`` for ``fraction`` of each recipe's reduction.

    A layer of ``n`` units whose recipe keeps ``k`` keeps ``n - round(fraction * (n - k))`` units
    (``fraction`` 1.0: the recipe's own count; 0.0: every unit), chosen by ``unit_strategy`` (default
    L1Max, DNIKit's default) on the layer's covariance in ``pfa`` (the :class:`PFA` the recipes came
    from). ``round_to``: round each count to the nearest multiple (:func:`rounded_count`; ``"auto"``:
    :func:`moco.profile.nchwc_block_size`, this CPU's block): ONNX Runtime's fast convolution kernels
    (the NCHWc layout) block channels by 8 on AVX2 (16 on AVX-512); on odd widths it falls back to
    slower kernels (a MobileNet at 0.72 of its widths, 1.8x fewer MACs, ran 1.7x *slower* than the
    original in ORT at odd widths and 1.44x faster rounded to 8: measured 2026-12-02, AVX2, 1 thread,
    batch 256; on AVX-512 see :mod:`moco.profile.hardware`). The form :func:`moco.compress.surgery.apply` takes.
    """
    from moco.compress.pfa.core import PFA

    f = float(fraction)
    if not 0.0 <= f <= 1.0:
        raise MocoError(f"fraction must be in [0, 1] (the share of the recipe's reduction to apply), got {fraction!r}")
    round_to = check_round_to(round_to)
    unit_strategy = unit_strategy or PFA.UnitSelectionStrategy.L1Max()
    keep = {}
    for name, recipe in recipes.items():
        if name not in pfa.statistics:
            raise MocoError(f"recipe layer {name!r} has no statistics in the given PFA; pass the PFA the recipes "
                            f"came from")
        n, k = recipe.original_count, recipe.recommended_count
        count = rounded_count(n - int(round(f * (n - k))), n, round_to)
        keep[name] = np.sort(unit_strategy.select(pfa.statistics[name].covariance, count)).tolist()
    return keep


def _check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    try:
        values = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        raise MocoError(f"fractions must be numbers in (0, 1], e.g. (0.25, 0.5, 0.75, 1.0); got {fractions!r}") from None
    if not values or any(not 0 < f <= 1 for f in values) or list(values) != sorted(set(values)):
        raise MocoError(f"fractions must be increasing numbers in (0, 1], e.g. (0.25, 0.5, 0.75, 1.0); got {fractions!r}")
    return values


class PFALoop:
    """Apply a PFA recipe step by step with fine-tuning, keeping the validation drop within ``max_drop``.

    Parameters: ``strategy`` / ``unit_strategy`` (``PFA.Strategy.*`` / ``PFA.UnitSelectionStrategy.*``;
    default KL and L1Max), ``layers`` (Conv2d/Linear names to analyse; default every conv/linear but the
    classifier), ``pfa`` (an existing :class:`PFA` of ``model``; else it is introspected on
    ``introspect_samples`` training images), ``fractions``, ``max_drop``, ``metric`` (``"accuracy"`` or
    ``"loss"``), ``finetune_epochs``, ``finetune_samples`` (None: all), ``lr``, ``schedule``
    (``"cosine"`` or ``"constant"``), ``distill`` (fine-tune with the original model as teacher),
    ``batch_size``, ``seed``, ``example_input`` (one input batch; default the first training sample),
    ``round_to`` (round every kept count to a multiple, e.g. 8, or ``"auto"`` for this CPU's ONNX Runtime
    block: :func:`partial_keep`),
    ``progress``.

    After :meth:`fit`: ``small_`` (the last accepted model, fine-tuned, eval mode), ``keep_`` (its
    ``{layer: kept indices}``), ``fraction_``, ``log_`` (tuple of :class:`PFAStep`), ``recipes_``,
    ``base_accuracy_`` / ``base_loss_`` / ``base_macs_``, ``accuracy_`` / ``loss_`` / ``macs_``,
    ``dropped_recipes_`` (tied layers whose recipe was left to their group's first layer),
    ``skipped_fractions_`` (fractions whose rounded counts removed no unit: not fine-tuned, not logged),
    ``seconds_``.
    """

    def __init__(self, *, strategy: Any = None, unit_strategy: Any = None, layers: Sequence[str] | None = None,
                 pfa: Any = None, fractions: Sequence[float] = (0.25, 0.5, 0.75, 1.0), max_drop: float = 0.01,
                 metric: str = "accuracy", finetune_epochs: int = 1, finetune_samples: int | None = 10_000,
                 lr: float = 1e-3, schedule: str = "cosine", distill: bool = False, batch_size: int = 128,
                 introspect_samples: int = 2000, seed: int = 0, example_input: torch.Tensor | None = None,
                 round_to: int | str | None = None, progress: bool = False):
        self.strategy = strategy
        self.unit_strategy = unit_strategy
        self.layers = layers
        self.pfa = pfa
        self.fractions = fractions
        self.max_drop = max_drop
        self.metric = metric
        self.finetune_epochs = finetune_epochs
        self.finetune_samples = finetune_samples
        self.lr = lr
        self.schedule = schedule
        self.distill = distill
        self.batch_size = batch_size
        self.introspect_samples = introspect_samples
        self.seed = seed
        self.example_input = example_input
        self.round_to = round_to
        self.progress = progress

    def _check(self) -> tuple[float, ...]:
        fractions = _check_fractions(self.fractions)
        if isinstance(self.max_drop, bool) or not isinstance(self.max_drop, (int, float)) or self.max_drop < 0:
            raise MocoError(f"max_drop must be a number >= 0 (an accuracy fraction, 0.01 = 1 point), got {self.max_drop!r}")
        if self.metric not in ("accuracy", "loss"):
            raise MocoError(f"metric must be 'accuracy' or 'loss', got {self.metric!r}")
        from moco.compress.prune import check_counts

        check_counts(self, ("finetune_epochs", "batch_size", "introspect_samples"), optional=("finetune_samples",))
        check_round_to(self.round_to)
        return fractions

    def _recipes(self, model: nn.Module, x_train: torch.Tensor, example: torch.Tensor):
        from moco.compress.pfa.core import PFA

        pfa = self.pfa
        if pfa is None:
            g = torch.Generator().manual_seed(self.seed)
            idx = torch.randperm(len(x_train), generator=g)[: self.introspect_samples]
            pfa = PFA.introspect(x_train[idx], model=model, layers=self.layers, progress=self.progress)
        elif not isinstance(pfa, PFA):
            raise TypeError(f"pfa must be a moco.compress.pfa.PFA of the model, got {type(pfa).__name__}")
        recipes = pfa.get_recipe(strategy=self.strategy, unit_strategy=self.unit_strategy)
        unit_strategy = self.unit_strategy or PFA.UnitSelectionStrategy.L1Max()
        chosen, dropped = leader_recipes(recipes, model, example)
        return pfa, recipes, chosen, dropped, unit_strategy

    def fit(self, model: nn.Module, train_data: Any, val_data: Any) -> "PFALoop":
        """Run the loop on a copy of ``model``; ``train_data`` for introspection and fine-tuning, ``val_data``
        (a split of the training data, never the test set) for the drop. ``(x, y)`` tensors or a dataset
        with ``.tensors()``. Returns self."""
        from moco.compress.finetune import finetune
        from moco.compress.prune import _labelled_tensors
        from moco.compress.surgery import apply
        from moco.profile import profile
        from moco.train import evaluate

        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        fractions = self._check()
        x_tr, y_tr = _labelled_tensors(train_data, "train_data")
        x_va, y_va = _labelled_tensors(val_data, "val_data")
        example = x_tr[:1] if self.example_input is None else self.example_input
        start = time.perf_counter()
        pfa, recipes, chosen, dropped, unit_strategy = self._recipes(model, x_tr, example)
        base = evaluate(model, (x_va, y_va), batch_size=max(self.batch_size, 1000))
        base_macs = profile(model, example, latency=False).per_sample("macs")
        gen = torch.Generator().manual_seed(self.seed)
        best, best_keep, best_fraction = copy.deepcopy(model).eval(), {}, 0.0
        best_eval, best_macs = base, base_macs
        log: list[PFAStep] = []
        skipped: list[float] = []
        for step, f in enumerate(fractions):
            t0 = time.perf_counter()
            keep = partial_keep(chosen, pfa, f, unit_strategy, round_to=self.round_to)
            if all(len(v) == chosen[n].original_count for n, v in keep.items()):
                # rounding (round_to) left every layer whole: fine-tuning would only move the weights for no saving
                skipped.append(float(f))
                continue
            small = apply(model, keep, example)
            idx = torch.randperm(len(x_tr), generator=gen)
            if self.finetune_samples is not None:
                idx = idx[: self.finetune_samples]
            finetune(small, (x_tr[idx], y_tr[idx]), epochs=self.finetune_epochs, lr=self.lr, schedule=self.schedule,
                     batch_size=self.batch_size, seed=self.seed + step, teacher=model if self.distill else None,
                     progress=self.progress)
            small.eval()
            ev = evaluate(small, (x_va, y_va), batch_size=max(self.batch_size, 1000))
            drop = (base.accuracy - ev.accuracy) if self.metric == "accuracy" else (ev.loss - base.loss)
            accepted = drop <= float(self.max_drop) + 1e-12
            macs = profile(small, example, latency=False).per_sample("macs")
            log.append(PFAStep(float(f), {n: len(v) for n, v in keep.items()}, int(macs), ev.accuracy, ev.loss,
                               float(drop), accepted, time.perf_counter() - t0))
            if not accepted:
                break
            best, best_keep, best_fraction, best_eval, best_macs = small, keep, float(f), ev, macs
        self.small_ = best.eval()
        self.keep_ = best_keep
        self.fraction_ = best_fraction
        self.log_ = tuple(log)
        self.recipes_ = recipes
        self.dropped_recipes_ = tuple(dropped)
        self.skipped_fractions_ = tuple(skipped)
        self.base_accuracy_, self.base_loss_, self.base_macs_ = base.accuracy, base.loss, int(base_macs)
        self.accuracy_, self.loss_, self.macs_ = best_eval.accuracy, best_eval.loss, int(best_macs)
        self.seconds_ = time.perf_counter() - start
        return self

    # ------------------------------------------------------------------ result protocol
    def _fitted(self) -> None:
        if not hasattr(self, "log_"):
            raise MocoError("call fit(model, train_data, val_data) first")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary: base and final accuracy / loss / MACs, fraction applied, steps, seconds."""
        self._fitted()
        return {
            "metric": self.metric, "max_drop": float(self.max_drop), "fraction": self.fraction_,
            "base_accuracy": self.base_accuracy_, "accuracy": self.accuracy_,
            "base_loss": self.base_loss_, "loss": self.loss_,
            "base_macs": self.base_macs_, "macs": self.macs_,
            "macs_reduction": self.base_macs_ / self.macs_ if self.macs_ else None,
            "units": {n: len(v) for n, v in self.keep_.items()},
            "dropped_recipes": list(self.dropped_recipes_), "skipped_fractions": list(self.skipped_fractions_),
            "steps": [s.to_dict() for s in self.log_], "seconds": self.seconds_,
        }

    def to_frame(self):
        """The steps as a pandas DataFrame (one row per step; ``units`` as total kept units)."""
        import pandas as pd

        self._fitted()
        rows = [{**s.to_dict(), "units": sum(s.units.values())} for s in self.log_]
        return pd.DataFrame(rows, columns=["fraction", "units", "macs", "accuracy", "loss", "drop", "accepted",
                                           "seconds"])

    def to_dataframe(self):
        """Alias of :meth:`to_frame` (the pruner's name)."""
        return self.to_frame()

    def to_text(self) -> str:
        """The step table (every column) and a one-line verdict."""
        self._fitted()
        unit = "accuracy points" if self.metric == "accuracy" else "nats of loss"
        scale = 100.0 if self.metric == "accuracy" else 1.0
        verdict = (f"kept fraction {self.fraction_:g} of the recipe's reduction: {self.base_macs_ / self.macs_:.2f}x "
                   f"fewer MACs, validation accuracy {self.base_accuracy_:.4f} -> {self.accuracy_:.4f} "
                   f"(budget {scale * float(self.max_drop):g} {unit})")
        if not self.log_:
            verdict = (f"no fraction ({', '.join(f'{f:g}' for f in self.skipped_fractions_)}) removes a unit after "
                       f"rounding to multiples of {check_round_to(self.round_to)}: the model is returned unchanged")
        elif self.fraction_ == 0.0:
            skipped = (f" (smaller fractions {', '.join(f'{f:g}' for f in self.skipped_fractions_)} removed no unit "
                       "after rounding)" if self.skipped_fractions_ else "")
            verdict = (f"even {self.log_[0].fraction:g} of the recipe's reduction{skipped} costs more than "
                       f"{scale * float(self.max_drop):g} {unit}: the model is returned unchanged")
        return self.to_frame().to_string(index=False) + "\n" + verdict

    def __str__(self) -> str:
        return self.to_text() if hasattr(self, "log_") else f"PFALoop(max_drop={self.max_drop}, unfitted)"
