"""The before/after report of a compression: size, work, accuracy and speed measured side by side.

:func:`compare_models` profiles the original and the compressed model (:func:`moco.profile.profile`:
parameters and MACs), evaluates both on the same labelled data, and times them in one interleaved,
round-robin run (:func:`moco.bench.compare`) together with the honest ways to run the original faster
(:func:`moco.bench.baseline_variants`: channels-last, ONNX Runtime, optionally ``torch.compile``) and,
when given, seed 003's zero-masked model of the same pruning, which has the original's size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from moco.batches import as_tensors
from moco.errors import MocoError

__all__ = ["CompressionReport", "MASKED", "ORIGINAL", "SMALL", "compare_models"]

ORIGINAL = "original"
SMALL = "small"
MASKED = "masked"


@dataclass(frozen=True)
class CompressionReport:
    """Original vs compressed model (and optionally the zero-masked model), measured side by side.

    Counts are per sample: ``params_*`` parameters, ``macs_*`` multiply-accumulates and ``flops_*``
    FLOPs (``2 * MACs`` + element-wise) from :func:`moco.profile.profile`. Accuracies are fractions on
    the ``n_samples`` evaluation samples (``accuracy_masked``: the zero-masked model, ``None`` without
    one). ``comparison`` is the timing of every variant (one run = all evaluation batches of
    ``batch_size``; seconds), named ``original/<baseline>``, ``small/<baseline>`` and ``masked/eager``;
    ``best_baseline``: the fastest variant of the original; ``unavailable``: variants left out, with
    the reason.

    Derived: ``params_reduction`` / ``macs_reduction`` = before / after (> 1 is smaller);
    ``accuracy_drop_points`` = (before - after) * 100 in percentage points; ``ratio_vs_eager`` = small
    eager median / original eager median (< 1 is faster); ``ratio_vs_best_baseline`` = small eager
    median / the fastest original variant's median; ``ratio_best_vs_best``: the fastest small variant
    over the fastest original variant; ``ratio_masked_vs_eager``: masked eager / original eager.
    """

    params_before: int
    params_after: int
    macs_before: float
    macs_after: float
    flops_before: float
    flops_after: float
    accuracy_before: float
    accuracy_after: float
    accuracy_masked: float | None
    n_samples: int
    batch_size: int
    comparison: Any
    best_baseline: str
    best_small: str
    unavailable: dict[str, str] = field(default_factory=dict)
    seed: int = 0

    @property
    def params_reduction(self) -> float:
        return self.params_before / self.params_after if self.params_after else float("inf")

    @property
    def macs_reduction(self) -> float:
        return self.macs_before / self.macs_after if self.macs_after else float("inf")

    @property
    def accuracy_drop_points(self) -> float:
        return 100.0 * (self.accuracy_before - self.accuracy_after)

    def _median(self, name: str) -> float:
        return self.comparison.timing(name).median_s

    @property
    def ratio_vs_eager(self) -> float:
        return self._median(f"{SMALL}/eager") / self._median(f"{ORIGINAL}/eager")

    @property
    def ratio_vs_best_baseline(self) -> float:
        return self._median(f"{SMALL}/eager") / self._median(self.best_baseline)

    @property
    def ratio_best_vs_best(self) -> float:
        return self._median(self.best_small) / self._median(self.best_baseline)

    @property
    def ratio_masked_vs_eager(self) -> float | None:
        if f"{MASKED}/eager" not in self.comparison.names:
            return None
        return self._median(f"{MASKED}/eager") / self._median(f"{ORIGINAL}/eager")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict: every field and derived ratio, ``timings`` (variant -> median seconds) and the
        full ``comparison``."""
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "params_reduction": self.params_reduction,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "macs_reduction": self.macs_reduction,
            "flops_before": self.flops_before,
            "flops_after": self.flops_after,
            "accuracy_before": self.accuracy_before,
            "accuracy_after": self.accuracy_after,
            "accuracy_masked": self.accuracy_masked,
            "accuracy_drop_points": self.accuracy_drop_points,
            "ratio_vs_eager": self.ratio_vs_eager,
            "ratio_vs_best_baseline": self.ratio_vs_best_baseline,
            "ratio_best_vs_best": self.ratio_best_vs_best,
            "ratio_masked_vs_eager": self.ratio_masked_vs_eager,
            "best_baseline": self.best_baseline,
            "best_small": self.best_small,
            "timings": {row.name: row.median_s for row in self.comparison.rows},
            "n_samples": self.n_samples,
            "batch_size": self.batch_size,
            "unavailable": dict(self.unavailable),
            "seed": self.seed,
            "comparison": self.comparison.to_dict(),
        }

    def to_frame(self):
        """The before/after table as a pandas DataFrame: params, MACs, FLOPs (per sample) and accuracy."""
        import pandas as pd

        return pd.DataFrame({
            "quantity": ["params", "macs_per_sample", "flops_per_sample", "accuracy"],
            "original": [self.params_before, self.macs_before, self.flops_before, self.accuracy_before],
            "compressed": [self.params_after, self.macs_after, self.flops_after, self.accuracy_after],
        })

    def __str__(self) -> str:
        return self.to_text()

    def to_text(self) -> str:
        """Two readable tables: size/work/accuracy before and after, then the side-by-side timing."""
        def count(v: float) -> str:
            return f"{v:,.0f}"

        rows = [
            ("", "original", "compressed", "reduction"),
            ("params", count(self.params_before), count(self.params_after), f"{self.params_reduction:.2f}x"),
            ("MACs / sample", count(self.macs_before), count(self.macs_after), f"{self.macs_reduction:.2f}x"),
            ("FLOPs / sample", count(self.flops_before), count(self.flops_after),
             f"{self.flops_before / self.flops_after:.2f}x" if self.flops_after else "inf"),
            ("accuracy", f"{self.accuracy_before:.2%}", f"{self.accuracy_after:.2%}",
             f"{self.accuracy_drop_points:+.2f} pt drop"),
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join([r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:]))]) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if self.accuracy_masked is not None:
            lines.append(f"zero-masked model (seed 003's emulation, original size): accuracy {self.accuracy_masked:.2%}")
        lines.append(f"accuracy on {self.n_samples:,} samples; timing: {self.batch_size} per batch")
        lines.append("")
        lines.append(self.comparison.to_text())
        lines.append(
            f"small eager vs original eager: {self.ratio_vs_eager:.3f}x time ({1 / self.ratio_vs_eager:.2f}x faster); "
            f"vs the best original variant ({self.best_baseline}): {self.ratio_vs_best_baseline:.3f}x; "
            f"best small ({self.best_small}) vs best original: {self.ratio_best_vs_best:.3f}x"
        )
        if self.ratio_masked_vs_eager is not None:
            lines.append(f"zero-masked vs original eager: {self.ratio_masked_vs_eager:.3f}x time "
                         "(zeroed weights are still multiplied)")
        lines += [f"{name}: excluded, {why}" for name, why in self.unavailable.items()]
        return "\n".join(lines)


def _size_and_work(model: nn.Module, example_input: torch.Tensor) -> tuple[int, float, float]:
    from moco.profile import profile

    prof = profile(model, example_input, latency=False)
    n = prof.batch_size
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return int(params), prof.totals.macs / n, prof.totals.flops / n


def compare_models(
    original: nn.Module,
    small: nn.Module,
    data: Any,
    *,
    example_input: torch.Tensor,
    batch_size: int = 1000,
    repeats: int = 5,
    warmup: int = 1,
    masked: nn.Module | None = None,
    baselines: Iterable[str] = ("eager", "channels_last", "onnxruntime"),
    small_variants: Iterable[str] = ("eager", "onnxruntime"),
    max_timing_samples: int | None = 10_000,
    seed: int = 0,
    progress: bool = False,
) -> CompressionReport:
    """Measure ``original`` against its compressed version ``small`` (and seed 003's ``masked`` model).

    ``data``: labelled evaluation data, ``(x, y)`` tensors or a dataset with ``.tensors()`` (use the
    test set). ``example_input``: one input batch for the profiler (counts are reported per sample).
    Accuracy of each model is measured on all of ``data`` (fractions). Timing: the first
    ``max_timing_samples`` samples (None: all) in batches of ``batch_size`` form one run; every variant
    is run ``warmup`` untimed and ``repeats`` timed runs, interleaved round-robin; times in seconds.
    Variants: ``original/<b>`` for ``b`` in ``baselines`` (``"eager"``, ``"channels_last"``,
    ``"compile"``, ``"onnxruntime"``; each kept only if it predicts like eager), ``small/<b>`` for
    ``small_variants``, and ``masked/eager`` when ``masked`` is given. ``seed`` is recorded in the
    report (the timing uses the first samples in order; nothing here is random).

    No model is modified (baselines run on deep copies). Raises MocoError for empty data, a model that
    fails on the data, or ``repeats``/``batch_size`` below 1; TypeError for non-module models.
    """
    from moco.bench import baseline_variants, compare
    from moco.train import evaluate

    for what, m in (("original", original), ("small", small), ("masked", masked)):
        if m is not None and not isinstance(m, nn.Module):
            raise TypeError(f"{what} must be a torch.nn.Module, got {type(m).__name__}")
    pair = as_tensors(data)
    if pair is None:
        raise TypeError(f"data must be in memory: (x, y) tensors or a dataset with .tensors(), got {type(data).__name__}")
    x, y = pair
    if y is None:
        raise MocoError("data has no labels; pass (x, y) so accuracy can be measured")
    if len(x) == 0:
        raise MocoError("data is empty; pass at least one labelled sample")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise MocoError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise MocoError(f"repeats must be an int >= 1, got {repeats!r}")
    if not isinstance(example_input, torch.Tensor) or example_input.dim() == 0:
        raise MocoError("example_input must be a batch tensor, e.g. x_test[:1]")
    baselines, small_variants = list(baselines), list(small_variants)
    if "eager" not in baselines or "eager" not in small_variants:
        raise MocoError("'eager' must be in baselines and small_variants: it is the reference of every ratio")

    params_before, macs_before, flops_before = _size_and_work(original, example_input)
    params_after, macs_after, flops_after = _size_and_work(small, example_input)
    acc_before = evaluate(original, (x, y), batch_size=batch_size).accuracy
    acc_after = evaluate(small, (x, y), batch_size=batch_size).accuracy
    acc_masked = evaluate(masked, (x, y), batch_size=batch_size).accuracy if masked is not None else None

    n_time = len(x) if max_timing_samples is None else min(len(x), int(max_timing_samples))
    batches = list(x[:n_time].split(batch_size))
    check = batches[:2]
    base = baseline_variants(original, batches[0], include=baselines, check_inputs=check)
    mine = baseline_variants(small, batches[0], include=small_variants, check_inputs=check)
    variants: dict[str, Any] = {}
    variants.update({f"{ORIGINAL}/{k}": v for k, v in base.variants.items()})
    variants.update({f"{SMALL}/{k}": v for k, v in mine.variants.items()})
    unavailable = {f"{ORIGINAL}/{k}": v for k, v in base.unavailable.items()}
    unavailable.update({f"{SMALL}/{k}": v for k, v in mine.unavailable.items()})
    for need in (f"{ORIGINAL}/eager", f"{SMALL}/eager"):
        if need not in variants:
            raise MocoError(f"{need} could not be timed: {unavailable.get(need, 'not built')}")
    if masked is not None:
        masked_set = baseline_variants(masked, batches[0], include=["eager"], check_inputs=check)
        variants[f"{MASKED}/eager"] = masked_set.variants["eager"]
    cmp = compare(variants, batches, baseline=f"{ORIGINAL}/eager", warmup=warmup, repeats=repeats,
                  progress=progress)
    original_names = [n for n in cmp.names if n.startswith(f"{ORIGINAL}/")]
    small_names = [n for n in cmp.names if n.startswith(f"{SMALL}/")]
    best = min(original_names, key=lambda n: cmp.timing(n).median_s)
    best_small = min(small_names, key=lambda n: cmp.timing(n).median_s)
    return CompressionReport(
        params_before=params_before, params_after=params_after,
        macs_before=macs_before, macs_after=macs_after, flops_before=flops_before, flops_after=flops_after,
        accuracy_before=acc_before, accuracy_after=acc_after, accuracy_masked=acc_masked,
        n_samples=len(x), batch_size=batch_size, comparison=cmp, best_baseline=best, best_small=best_small,
        unavailable=unavailable, seed=seed,
    )
