"""Fair wall-clock comparison of several ways to run the same model: ``compare(variants, inputs)``.

Fairness rules, all applied by :func:`compare`:

* every variant gets the same warm-up runs before anything is timed (lazy initialisation, compilation
  for each batch shape, allocator growth and caches happen there);
* timed runs are **interleaved**: each round runs every variant once, and the order of the variants is
  rotated every round (round-robin), so slow drift of a shared, noisy machine (thermal state, other
  processes) hits every variant alike instead of whichever happened to run last;
* one timed "run" is a call of the variant on every batch of ``inputs`` in order, timed as a whole with
  ``time.perf_counter`` under ``torch.inference_mode()``, with Python's garbage collector paused;
* the summary is the median of the runs (robust to the odd slow run); min and max are kept to show
  the spread, and every raw time is kept for later analysis.

All times are in seconds.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from moco.errors import MocoError
from moco.profile.hardware import cpu_name
from moco.progress import show_progress

__all__ = ["SETTLE_S", "Comparison", "Timing", "compare"]

#: seconds :func:`compare` sleeps before each timed run by default (idle worker threads; see there)
SETTLE_S = 0.1


@dataclass(frozen=True)
class Timing:
    """The timed runs of one variant.

    ``times`` are the wall-clock seconds of each timed run (one run = every batch once), in the order
    they were measured; ``median_s``, ``min_s`` and ``max_s`` summarise them; ``ratio`` is this
    variant's median divided by the baseline's median (below 1: faster than the baseline).
    """

    name: str
    median_s: float
    min_s: float
    max_s: float
    times: tuple[float, ...]
    ratio: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the fields (``times`` as a list)."""
        return {
            "name": self.name,
            "median_s": self.median_s,
            "min_s": self.min_s,
            "max_s": self.max_s,
            "times": list(self.times),
            "ratio": self.ratio,
        }


@dataclass(frozen=True)
class Comparison:
    """Result of :func:`compare`: one :class:`Timing` row per variant (in the order given) plus the context.

    Context fields: ``baseline`` (name of the reference variant), ``threads`` / ``interop_threads``
    (``torch.get_num_threads()`` / ``torch.get_num_interop_threads()`` during the measurement),
    ``torch_version``, ``platform``, ``cpu`` (processor model name), ``cpu_count`` (logical cores),
    ``repeats`` (timed runs per variant), ``warmup`` (untimed runs per variant), ``n_batches``,
    ``batch_size`` (size of the first batch), ``batch_sizes`` (the distinct batch sizes, sorted),
    ``n_samples`` (samples in one run) and ``settle_s`` (seconds slept before each timed run).
    """

    rows: tuple[Timing, ...]
    baseline: str
    threads: int
    interop_threads: int
    torch_version: str
    platform: str
    cpu: str
    cpu_count: int
    repeats: int
    warmup: int
    n_batches: int
    batch_size: int
    batch_sizes: tuple[int, ...]
    n_samples: int
    settle_s: float = 0.0

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the variants, in the order given to :func:`compare`."""
        return tuple(row.name for row in self.rows)

    def timing(self, name: str) -> Timing:
        """The :class:`Timing` row of variant ``name``; MocoError listing the variants when unknown."""
        for row in self.rows:
            if row.name == name:
                return row
        raise MocoError(f"no variant {name!r} in this comparison; it has: {', '.join(self.names)}")

    def ratio(self, name: str) -> float:
        """Median time of ``name`` divided by the baseline's median time (below 1 means faster)."""
        return self.timing(name).ratio

    def samples_per_s(self, name: str) -> float:
        """Throughput of ``name``: samples of one run divided by its median run time (samples / second)."""
        median = self.timing(name).median_s
        return self.n_samples / median if median > 0 else float("inf")

    @property
    def fastest(self) -> str:
        """Name of the variant with the smallest median time (the first one on a tie)."""
        return min(self.rows, key=lambda row: row.median_s).name

    def best_excluding(self, names: Iterable[str]) -> str:
        """Name of the fastest variant (smallest median) that is not in ``names``.

        Typical use: the best competitor of a method, ``comparison.best_excluding(["mine"])``.
        Raises MocoError when ``names`` excludes every variant.
        """
        excluded = {names} if isinstance(names, str) else set(names)
        rest = [row for row in self.rows if row.name not in excluded]
        if not rest:
            raise MocoError(
                f"best_excluding({sorted(excluded)}) leaves no variant; the comparison has: {', '.join(self.names)}"
            )
        return min(rest, key=lambda row: row.median_s).name

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict: ``rows`` (list of Timing dicts), ``fastest`` and every context field."""
        return {
            "rows": [row.to_dict() for row in self.rows],
            "baseline": self.baseline,
            "fastest": self.fastest,
            "threads": self.threads,
            "interop_threads": self.interop_threads,
            "torch_version": self.torch_version,
            "platform": self.platform,
            "cpu": self.cpu,
            "cpu_count": self.cpu_count,
            "repeats": self.repeats,
            "warmup": self.warmup,
            "n_batches": self.n_batches,
            "batch_size": self.batch_size,
            "batch_sizes": list(self.batch_sizes),
            "n_samples": self.n_samples,
            "settle_s": self.settle_s,
        }

    def to_dataframe(self):
        """A pandas DataFrame, one row per variant: median/min/max seconds, ratio, samples per second."""
        import pandas as pd

        return pd.DataFrame(
            [
                {
                    "name": row.name,
                    "median_s": row.median_s,
                    "min_s": row.min_s,
                    "max_s": row.max_s,
                    "ratio": row.ratio,
                    "samples_per_s": self.samples_per_s(row.name),
                    "repeats": len(row.times),
                }
                for row in self.rows
            ]
        ).set_index("name")

    def to_text(self) -> str:
        """A readable, aligned table (times in seconds, ratio as ``0.42x`` of the baseline) with its context."""
        header = ("variant", "median s", "min s", "max s", "ratio", "samples/s")
        body = [
            (
                row.name + (" *" if row.name == self.baseline else ""),
                f"{row.median_s:.4f}",
                f"{row.min_s:.4f}",
                f"{row.max_s:.4f}",
                f"{row.ratio:.2f}x",
                f"{self.samples_per_s(row.name):,.0f}",
            )
            for row in self.rows
        ]
        widths = [max(len(r[i]) for r in (header, *body)) for i in range(len(header))]

        def line(cells: Sequence[str]) -> str:
            first = cells[0].ljust(widths[0])
            return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))]).rstrip()

        sizes = ",".join(str(s) for s in self.batch_sizes)
        lines = [
            line(header),
            line(["-" * w for w in widths]),
            *(line(r) for r in body),
            f"* baseline ({self.baseline}); ratio = median / baseline median; fastest: {self.fastest}",
            f"one run = {self.n_batches} batch(es) of {sizes} ({self.n_samples:,} samples); "
            f"{self.warmup} warm-up + {self.repeats} timed runs per variant, interleaved round-robin"
            + (f", {self.settle_s:g} s settle before each" if self.settle_s else ""),
            f"torch {self.torch_version}, {self.threads} thread(s) (interop {self.interop_threads}), "
            f"{self.cpu} ({self.cpu_count} logical cores), {self.platform}",
        ]
        return "\n".join(lines)


def _as_batches(inputs: Any) -> list[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        batches = [inputs]
    elif isinstance(inputs, (list, tuple)):
        batches = list(inputs)
    else:
        raise MocoError(
            f"inputs must be a tensor (one batch) or a list/tuple of batch tensors, got {type(inputs).__name__}"
        )
    if not batches:
        raise MocoError("inputs is empty; pass at least one batch tensor")
    for i, batch in enumerate(batches):
        if not isinstance(batch, torch.Tensor):
            raise MocoError(f"inputs[{i}] is a {type(batch).__name__}, not a tensor; pass batch tensors")
        if batch.dim() == 0:
            raise MocoError(f"inputs[{i}] is a 0-d tensor; a batch needs a leading batch dimension")
    return batches


def _check_variants(variants: Any) -> dict[str, Callable[[torch.Tensor], Any]]:
    if not isinstance(variants, Mapping):
        raise MocoError(f"variants must be a dict name -> callable, got {type(variants).__name__}")
    if not variants:
        raise MocoError("variants is empty; pass a dict of at least one name -> callable(batch)")
    for name, fn in variants.items():
        if not isinstance(name, str) or not name:
            raise MocoError(f"variant names must be non-empty strings, got {name!r}")
        if not callable(fn):
            raise MocoError(f"variant {name!r} is a {type(fn).__name__}, not a callable taking one batch")
    return dict(variants)


def _run(fn: Callable[[torch.Tensor], Any], batches: list[torch.Tensor]) -> None:
    for batch in batches:
        fn(batch)


def compare(
    variants: Mapping[str, Callable[[torch.Tensor], Any]],
    inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    baseline: str | None = None,
    warmup: int = 2,
    repeats: int = 7,
    progress: bool = False,
    settle: float = SETTLE_S,
    clock: Callable[[], float] = time.perf_counter,
) -> Comparison:
    """Time every variant on the same inputs, interleaved and round-robin, and compare to a baseline.

    ``variants`` maps a name to a callable taking one batch tensor and returning an output (the output
    is discarded); its order is kept in the result and the first one is the baseline unless
    ``baseline`` names another. ``inputs`` is one batch tensor or a list/tuple of them; one run calls a
    variant on every batch in order and is timed as a whole.

    First each variant runs ``warmup`` untimed runs (>= 1 recommended: a compiled variant compiles for
    each new batch shape there). Then come ``repeats`` rounds; round ``r`` runs every variant once,
    starting with variant ``r mod len(variants)`` (the order rotates), timing each run with ``clock``
    (seconds; ``time.perf_counter`` unless injected for tests) under ``torch.inference_mode()`` with
    the garbage collector paused. Before each timed run the harness sleeps ``settle`` seconds
    (:data:`SETTLE_S`), so that the worker threads of the variant that ran before have gone idle:
    ONNX Runtime's intra-op pool spin-waits after a run (its default, which is what makes it fast at
    batch 1) and, interleaved, those spinning threads take the cores from the next variant. Measured
    2026-12-02 (AVX-512 EPYC, 2 threads): fashion_cnn in ORT at batch 1000 took 32.4 ms alone and 56.6 ms
    interleaved with two other ORT sessions; at batch 1 (300 images) 22.8 ms alone and 68.4 ms
    interleaved; a 0.1 s settle gave back the times alone (33.3 and 22.5 ms), 0.02 s did not.
    ``progress=True`` shows a progress bar on stderr.

    Returns a :class:`Comparison` (median/min/max/all seconds per variant, ratio to the baseline's
    median, threads, torch version, CPU, batch sizes). Raises MocoError for empty variants or inputs,
    an unknown ``baseline``, ``repeats < 1`` or ``warmup < 0``.
    """
    fns = _check_variants(variants)
    names = list(fns)
    if baseline is None:
        baseline = names[0]
    elif baseline not in fns:
        raise MocoError(f"baseline {baseline!r} is not a variant; choose one of: {', '.join(names)}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise MocoError(f"repeats must be an int >= 1 (timed runs per variant), got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise MocoError(f"warmup must be an int >= 0 (untimed runs per variant), got {warmup!r}")
    if isinstance(settle, bool) or not isinstance(settle, (int, float)) or not 0 <= settle <= 60:
        raise MocoError(f"settle must be seconds in [0, 60] slept before each timed run, got {settle!r}")
    batches = _as_batches(inputs)

    from tqdm.auto import tqdm

    times: dict[str, list[float]] = {name: [] for name in names}
    bar = tqdm(total=(warmup + repeats) * len(names), desc="compare", unit="run", file=sys.stderr,
               disable=not show_progress(progress), leave=False)
    gc_was_enabled = gc.isenabled()
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                for name in names:
                    _run(fns[name], batches)
                    bar.update(1)
            gc.collect()
            gc.disable()
            for r in range(repeats):
                start = r % len(names)
                for name in names[start:] + names[:start]:
                    fn = fns[name]
                    if settle:
                        time.sleep(settle)
                    t0 = clock()
                    _run(fn, batches)
                    t1 = clock()
                    times[name].append(float(t1 - t0))
                    bar.update(1)
    finally:
        if gc_was_enabled:
            gc.enable()
        bar.close()

    base_median = statistics.median(times[baseline])
    rows = []
    for name in names:
        median = statistics.median(times[name])
        if base_median > 0:
            ratio = median / base_median
        else:
            ratio = 1.0 if median == base_median else float("inf")
        rows.append(Timing(name, median, min(times[name]), max(times[name]), tuple(times[name]), ratio))
    sizes = [int(batch.shape[0]) for batch in batches]
    return Comparison(
        rows=tuple(rows),
        baseline=baseline,
        threads=torch.get_num_threads(),
        interop_threads=torch.get_num_interop_threads(),
        torch_version=torch.__version__,
        platform=platform.platform(),
        cpu=cpu_name(),
        cpu_count=os.cpu_count() or 1,
        repeats=repeats,
        warmup=warmup,
        n_batches=len(batches),
        batch_size=sizes[0],
        batch_sizes=tuple(sorted(set(sizes))),
        n_samples=sum(sizes),
        settle_s=float(settle),
    )
