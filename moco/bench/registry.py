"""Registered benchmarks behind ``moco bench NAME``.

A benchmark is a function ``fn(quick: bool, seed: int, out=print) -> dict`` registered with
:func:`register`: it prints a readable table through ``out`` and returns a JSON-able result dict.
:func:`run_benchmark` seeds the random generators, runs it, adds a ``"meta"`` entry (versions,
threads, platform, seed, wall seconds, peak memory) and prints the result as one JSON object on the
last stdout line, so scripts can read ``moco bench NAME | tail -n 1``.

Benchmark modules are imported only when needed: :data:`BENCHMARK_MODULES` maps each built-in
benchmark name to the module that registers it, which keeps ``moco --help`` fast.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import platform
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

from moco.errors import MocoError

__all__ = ["BENCHMARK_MODULES", "Benchmark", "list_benchmarks", "register", "run_benchmark"]

#: Built-in benchmark name -> module that registers it when imported.
BENCHMARK_MODULES: dict[str, str] = {
    "baselines": "moco.bench.bench_baselines",
    "rules-mnist": "moco.bench.bench_rules_mnist",
    "exits-fashion": "moco.bench.bench_exits_fashion",
    "exits-mnist-retrofit": "moco.bench.bench_exits_mnist_retrofit",
    "prune-fashion": "moco.bench.bench_prune_fashion",
    "pfa-fashion": "moco.bench.bench_pfa_fashion",
    "pfa-cifar": "moco.bench.bench_pfa_cifar",
    "approx-lenet": "moco.bench.bench_approx_lenet",
    "compose-fashion": "moco.bench.bench_compose_fashion",
    "train-engine": "moco.bench.bench_train_engine",
    "sweep-fashion": "moco.bench.bench_sweep_fashion",
}


@dataclass(frozen=True)
class Benchmark:
    """One registered benchmark: its name, one-line summary and function ``fn(quick, seed, out) -> dict``."""

    name: str
    summary: str
    fn: Callable[..., dict]


_REGISTRY: dict[str, Benchmark] = {}


def register(name: str, summary: str) -> Callable[[Callable[..., dict]], Callable[..., dict]]:
    """Decorator: register ``fn(quick: bool, seed: int, out=print) -> dict`` as benchmark ``name``.

    ``summary`` is the one line ``moco bench --list`` shows. Registering a different function under a
    taken name raises MocoError (re-importing the same function is allowed).
    """
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise MocoError(f"benchmark name must be a non-empty string without spaces, got {name!r}")

    def deco(fn: Callable[..., dict]) -> Callable[..., dict]:
        old = _REGISTRY.get(name)
        if old is not None and (old.fn.__module__, old.fn.__qualname__) != (fn.__module__, fn.__qualname__):
            raise MocoError(f"benchmark {name!r} is already registered by {old.fn.__module__}.{old.fn.__qualname__}; "
                            "choose another name")
        _REGISTRY[name] = Benchmark(name, " ".join(summary.split()), fn)
        return fn

    return deco


def _load(name: str) -> None:
    """Import the module of built-in benchmark ``name`` (it registers itself), if not done yet."""
    if name not in _REGISTRY and name in BENCHMARK_MODULES:
        importlib.import_module(BENCHMARK_MODULES[name])


def list_benchmarks() -> list[tuple[str, str]]:
    """``(name, summary)`` of every benchmark, built-in and registered, sorted by name.

    Imports the built-in benchmark modules (they import their heavy dependencies only when run); a
    module that fails to import is listed with the error as its summary.
    """
    broken = {}
    for name in BENCHMARK_MODULES:
        try:
            _load(name)
        except Exception as exc:  # noqa: BLE001 - listing must not fail because one benchmark is broken
            broken[name] = f"(cannot be loaded: {type(exc).__name__}: {exc})"
    found = {name: bench.summary for name, bench in _REGISTRY.items()}
    found.update({name: text for name, text in broken.items() if name not in found})
    return sorted(found.items())


def _names() -> list[str]:
    return sorted(set(BENCHMARK_MODULES) | set(_REGISTRY))


def _peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _json_default(obj: Any) -> Any:
    """JSON fallback for numpy scalars/arrays, tensors, paths and sets."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (Path, set, frozenset)):
        return str(obj) if isinstance(obj, Path) else sorted(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def run_benchmark(
    name: str,
    *,
    quick: bool = False,
    seed: int = 0,
    json_path: str | Path | None = None,
    stream: TextIO | None = None,
    track: bool = False,
    tracking_uri: str | None = None,
    experiment: str | None = None,
) -> dict:
    """Run benchmark ``name`` and return its result dict with a ``"meta"`` entry added.

    Seeds ``random``, numpy and torch with ``seed``; ``quick=True`` asks the benchmark for its small,
    fast version. The benchmark's table goes to ``stream`` (default: ``sys.stdout`` at call time),
    followed by the result as one JSON object on one line, always the last line written. ``meta``
    holds the torch, moco and python versions, threads, platform, seed, quick, ``wall_s`` (seconds the
    benchmark ran) and ``peak_rss_mb`` (the process's peak resident memory so far, MB). With
    ``json_path`` the result is also written there atomically (indented JSON). Unknown ``name`` ->
    MocoError listing the benchmarks.

    ``track=True`` logs one MLflow run (experiment ``experiment``, default ``moco-bench``, at
    ``tracking_uri``, see :func:`moco.track.resolve_tracking_uri`): the settings as params, every numeric
    leaf of the result as a metric (flattened keys), the JSON and the table as artifacts, and the epochs
    of any training the benchmark does (``epoch/loss``, ``epoch/train_accuracy``, ... at step = epoch);
    ``meta.mlflow_run_id`` names the run. A bad URI fails before the
    benchmark runs; a benchmark that raises leaves its run FAILED.
    """
    _load(name)
    if name not in _REGISTRY:
        raise MocoError(f"unknown benchmark {name!r}; choose one of: {', '.join(_names())} (see 'moco bench --list')")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise MocoError(f"seed must be an int, got {seed!r}")
    stream = sys.stdout if stream is None else stream
    tracker = table = None
    if track:
        from moco.track.tracking import log_benchmark_result, observe_epochs, track_benchmark

        tracker = track_benchmark(name, quick=bool(quick), seed=seed, tracking_uri=tracking_uri, experiment=experiment)
        table = io.StringIO()

    def out(*args, sep: str = " ", end: str = "\n", **_) -> None:
        print(*args, sep=sep, end=end, file=stream, flush=True)
        if table is not None:  # the table, as printed, becomes an artifact of the run
            print(*args, sep=sep, end=end, file=table)

    with contextlib.ExitStack() as scope:
        if tracker is not None:
            scope.enter_context(tracker)  # FINISHED, or FAILED with the error when anything below raises
            scope.enter_context(observe_epochs(tracker.epoch_callback(prefix="epoch/")))  # apart from the JSON's names
        result, line = _execute(name, quick=bool(quick), seed=seed, out=out,
                                extra_meta={"mlflow_run_id": tracker.run_id} if tracker is not None else {})
        if json_path is not None:
            from moco.io import write_json_atomic

            write_json_atomic(json_path, result)
        if tracker is not None:
            log_benchmark_result(tracker, result, table.getvalue())
    if tracker is not None:
        print(f"tracked: MLflow run {tracker.run_id} in experiment {tracker.experiment!r} at {tracker.tracking_uri}",
              file=sys.stderr, flush=True)
    out(line)
    return result


def _execute(name: str, *, quick: bool, seed: int, out: Callable[..., None], extra_meta: dict) -> tuple[dict, str]:
    """Seed, run benchmark ``name``, add ``meta``; returns the result (plain JSON types) and its JSON line."""
    import numpy as np
    import torch

    import moco

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    result = _REGISTRY[name].fn(quick=quick, seed=seed, out=out)
    wall = time.perf_counter() - t0
    if not isinstance(result, dict):
        raise TypeError(f"benchmark {name!r} returned a {type(result).__name__}; benchmarks must return a dict")
    meta = dict(result.get("meta") or {})
    meta.update(
        benchmark=name,
        torch=torch.__version__,
        moco=moco.__version__,
        python=platform.python_version(),
        threads=torch.get_num_threads(),
        interop_threads=torch.get_num_interop_threads(),
        platform=platform.platform(),
        seed=seed,
        quick=quick,
        wall_s=round(wall, 3),
        peak_rss_mb=round(_peak_rss_mb(), 1),
        **extra_meta,
    )
    result = {**result, "meta": meta}
    line = json.dumps(result, sort_keys=True, default=_json_default)
    return json.loads(line), line  # the caller gets exactly what was printed (plain JSON types)
