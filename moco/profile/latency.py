"""Wall-clock latency per module (exclusive time, seconds) and of the whole forward pass.

A module's *exclusive* time in one forward pass is the time between its forward pre-hook and its
forward hook minus the inclusive time of the model modules it called, summed over its calls in that
pass. Timing uses ``time.perf_counter``; the per-module value is the median over ``repeats`` passes
after ``warmup`` untimed passes. The hook bookkeeping of a child is charged to its parent, so the
exclusive times add up to slightly more than a forward pass without hooks, which is measured
separately (median of ``repeats`` passes, no hooks at all).

The caller is responsible for ``torch.no_grad()`` and for the model's train/eval mode.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from moco.profile.tracking import CallTracker

__all__ = ["LatencyResult", "measure_latency"]


@dataclass(frozen=True)
class LatencyResult:
    """Median exclusive seconds per module name, and median seconds of a whole forward pass without hooks."""

    per_module_s: dict[str, float]
    forward_s: float


class _ExclusiveTimer:
    """``on_enter`` / ``on_exit`` callbacks that accumulate exclusive seconds per module name."""

    def __init__(self) -> None:
        self._frames: list[list[Any]] = []  # [name, start, seconds spent in children]
        self.seconds: dict[str, float] = defaultdict(float)

    def on_enter(self, name: str) -> None:
        self._frames.append([name, 0.0, time.perf_counter()])

    def on_exit(self, name: str, output: Any) -> None:
        now = time.perf_counter()
        frame_name, children_s, start = self._frames.pop()
        inclusive = now - start
        self.seconds[frame_name] += inclusive - children_s
        if self._frames:
            self._frames[-1][1] += inclusive


def measure_latency(model: nn.Module, inputs: Sequence[torch.Tensor], *, repeats: int, warmup: int) -> LatencyResult:
    """Time ``model(*inputs)``: per-module exclusive seconds (median of ``repeats``) and the whole pass.

    Runs ``warmup + 2 * repeats`` forward passes: warm-up, hooked passes for the per-module times, and
    un-hooked passes for the whole-forward time.
    """
    for _ in range(warmup):
        model(*inputs)
    passes: list[dict[str, float]] = []
    for _ in range(repeats):
        timer = _ExclusiveTimer()
        with CallTracker(model, on_enter=timer.on_enter, on_exit=timer.on_exit):
            model(*inputs)
        passes.append(dict(timer.seconds))
    names = {name for one in passes for name in one}
    per_module = {name: statistics.median(one.get(name, 0.0) for one in passes) for name in names}
    whole = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(*inputs)
        whole.append(time.perf_counter() - start)
    return LatencyResult(per_module, statistics.median(whole))
