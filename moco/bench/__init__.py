"""Measurements that back moco's claims: fair timing, honest baselines and the ``moco bench`` benchmarks.

* :func:`compare` times variants of a model interleaved and round-robin and reports median seconds and
  ratios to a baseline (:class:`Comparison`, :class:`Timing`);
* :func:`baseline_variants` builds eager, channels-last, ``torch.compile`` and onnxruntime versions of
  any model, each checked to predict like eager before it may be timed (:class:`BaselineSet`);
* :func:`register`, :func:`list_benchmarks` and :func:`run_benchmark` run named benchmarks whose last
  stdout line is their JSON result.
"""

from moco.bench.baselines import BASELINE_NAMES, Agreement, BaselineSet, baseline_variants, best_baseline
from moco.bench.harness import Comparison, Timing, compare
from moco.bench.registry import BENCHMARK_MODULES, Benchmark, list_benchmarks, register, run_benchmark

__all__ = [
    "BASELINE_NAMES",
    "BENCHMARK_MODULES",
    "Agreement",
    "BaselineSet",
    "Benchmark",
    "Comparison",
    "Timing",
    "baseline_variants",
    "best_baseline",
    "compare",
    "list_benchmarks",
    "register",
    "run_benchmark",
]
