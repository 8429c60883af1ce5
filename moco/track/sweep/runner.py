"""``run_sweep``: a sweep on an Optuna study, in ``workers`` processes on this machine, resumable.

Processes and threads. ``workers=N`` runs N worker processes on one study: the calling process itself
(worker 0) and ``N - 1`` subprocesses. Each sets torch's intra-op threads to ``max(1, cores // N)``
(``cores``: the CPUs this process may use, ``os.sched_getaffinity``), and ``OMP_NUM_THREADS``/
``MKL_NUM_THREADS`` to the same, so N workers fill the machine without oversubscribing it. The other
workers are started as ``python -m moco.track.sweep.worker`` subprocesses and die with the sweep (``PR_SET_PDEATHSIG``); more machines join
the same study by running the same command with ``--storage postgresql://...`` and ``--study NAME``.

Resume. Running the same command again continues the study: finished trials (complete, pruned, failed
with an error) are not redone; trials left RUNNING by a killed process are found (see
:mod:`moco.track.sweep.storage`), marked FAIL as interrupted and re-run once; grid points are queued
exactly once. When the workers of a round are done, interrupted trials found meanwhile (a worker that
crashed) are queued and another round runs, so one command ends with every point accounted for.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from moco.errors import MocoError
from moco.io import prepare_out_dir
from moco.results import ResultProtocol, frame_text, json_safe
from moco.track.sweep.config import SweepConfig, dumps_toml, load_sweep, sweep_from_dict
from moco.track.sweep.storage import (INTERRUPTED_ATTR, STALE_AFTER_S, StorageSpec, StudyLock,
                                      claim_trial, count_trials, enqueue_grid, open_study, parse_storage,
                                      process_identity, recover_interrupted)

__all__ = ["SWEEP_FORMAT", "SweepResult", "cpu_cores", "default_out", "default_study", "run_sweep", "worker_loop",
           "worker_threads"]

SWEEP_FORMAT = "moco.sweep"
SWEEP_VERSION = 1
_MAX_ROUNDS = 3


def cpu_cores() -> int:
    """CPUs this process may run on (the affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def worker_threads(workers: int, cores: int | None = None) -> int:
    """torch threads per worker: ``max(1, cores // workers)``."""
    return max(1, (cores or cpu_cores()) // max(1, workers))


def default_study(cfg: SweepConfig) -> str:
    """The study name: the sweep's name, with ``-quick`` for a ``--quick`` run (another study: other sizes)."""
    return cfg.name + ("-quick" if cfg.quick else "")


def default_out(cfg: SweepConfig) -> Path:
    """``moco-out/sweeps/<name>`` (``<name>-quick`` with ``--quick``)."""
    return Path("moco-out") / "sweeps" / default_study(cfg)


# ------------------------------------------------------------------------------------------ result

@dataclass(frozen=True)
class SweepResult(ResultProtocol):
    """A finished sweep: its trials (one dict each: number, state, params, values, user attributes), the
    counts, the ``best`` trial (single objective) or the Pareto front (several), and where it all is."""

    name: str
    study_name: str
    storage: str
    out: str
    objectives: tuple[str, ...]
    directions: tuple[str, ...]
    param_names: tuple[str, ...]
    label: str
    trials: tuple[dict[str, Any], ...]
    counts: dict[str, int]
    pareto: tuple[int, ...]
    seconds: float
    workers: int
    threads: int
    total: int
    label_of: Callable[[Mapping[str, Any]], str] = field(repr=False, compare=False, default=str)

    def _complete(self) -> list[dict[str, Any]]:
        return [t for t in self.trials if t["state"] == "COMPLETE" and t["values"]]

    def _sort_key(self, t: dict[str, Any]):
        if not t["values"]:
            return (1, 0.0, t["number"])
        v = t["values"][0]
        return (0, -v if self.directions[0] == "maximize" else v, t["number"])

    @property
    def best(self) -> dict[str, Any] | None:
        """The best complete trial by the first objective (on the Pareto front when there are several)."""
        pool = [t for t in self._complete() if t["number"] in self.pareto] or self._complete()
        return min(pool, key=self._sort_key) if pool else None

    def _trial_summary(self, t: dict[str, Any] | None) -> dict[str, Any] | None:
        if t is None:
            return None
        return {"number": t["number"], "label": self.label_of(t["params"]), "params": t["params"],
                "values": dict(zip(self.objectives, t["values"])), "artifacts": t["attrs"].get("artifacts")}

    def summary(self) -> dict[str, Any]:
        """The last stdout line of ``moco sweep``."""
        c = self.counts
        return json_safe({
            "trials": c["trials"], "complete": c["complete"], "failed": c["failed"], "pruned": c["pruned"],
            "interrupted": c["interrupted"], "running": c["running"], "waiting": c["waiting"],
            "best": self._trial_summary(self.best), "pareto_size": len(self.pareto), "pareto": list(self.pareto),
            "objectives": list(self.objectives), "directions": list(self.directions), "out": self.out,
            "storage": self.storage, "study": self.study_name, "workers": self.workers, "threads": self.threads,
            "seconds": round(self.seconds, 3),
        })

    def to_dict(self) -> dict[str, Any]:
        return json_safe({**self.summary(), "name": self.name, "param_names": list(self.param_names),
                          "front": [self._trial_summary(t) for t in self._complete() if t["number"] in self.pareto],
                          "trials_table": [
                              {"number": t["number"], "state": t["state"], "params": t["params"],
                               "values": t["values"], **{k: t["attrs"].get(k) for k in _ATTR_COLUMNS},
                               "error": t["attrs"].get("error")} for t in self.trials]})

    def to_frame(self):
        import pandas as pd

        rows = []
        for t in sorted(self.trials, key=self._sort_key):
            row = {"trial": t["number"], "state": t["state"].lower()}
            for name in self.param_names:
                row[name.split(".")[-1]] = t["params"].get(name)
            for i, obj in enumerate(self.objectives):
                row[obj] = t["values"][i] if t["values"] else t["attrs"].get(obj)
            for k in _ATTR_COLUMNS:
                if k not in self.objectives and k in t["attrs"]:
                    row[k] = t["attrs"][k]
            row["pareto"] = "*" if t["number"] in self.pareto else ""
            row["error"] = (t["attrs"].get("error") or "")[:60]
            rows.append(row)
        frame = pd.DataFrame(rows)
        return frame.drop(columns=[c for c in ("pareto", "error") if c in frame and not frame[c].astype(bool).any()])

    def to_text(self) -> str:
        lines = [frame_text(self.to_frame()) if self.trials else "(no trials)"]
        c = self.counts
        lines.append(f"{c['trials']} trials: {c['complete']} complete, {c['pruned']} pruned, {c['failed']} failed, "
                     f"{c['interrupted']} interrupted (re-run), {c['running']} running elsewhere, {c['waiting']} waiting; "
                     f"{self.workers} worker(s) x {self.threads} thread(s), {self.seconds:.1f} s")
        legend = f"{self.label}({', '.join(self.param_names)})"
        if len(self.objectives) == 1:
            b = self.best
            if b is not None:
                lines.append(f"best: {self.label_of(b['params'])}  {self.objectives[0]} {b['values'][0]:.4g}  "
                             f"(trial {b['number']}, {b['attrs'].get('artifacts')}; {legend})")
        else:
            lines.append(f"Pareto front of {' vs '.join(self.objectives)} ({len(self.pareto)} trials; {legend}):")
            for t in sorted((t for t in self._complete() if t["number"] in self.pareto), key=self._sort_key):
                vals = ", ".join(f"{o} {v:.4g}" for o, v in zip(self.objectives, t["values"]))
                lines.append(f"  {self.label_of(t['params'])}  {vals}  (trial {t['number']})")
        lines.append(f"study {self.study_name!r} in {self.storage}; trials in {Path(self.out) / 'trials'}")
        return "\n".join(lines)


_ATTR_COLUMNS = ("test_accuracy", "train_accuracy", "train_seconds", "epochs", "stopped", "macs", "params",
                 "latency_ms", "agreement", "macs_reduction", "ratio_vs_eager")


def _pareto(trials: list[dict[str, Any]], directions) -> tuple[int, ...]:
    """Numbers of the complete trials no other complete trial dominates."""
    signs = [1.0 if d == "maximize" else -1.0 for d in directions]
    pts = [(t["number"], [s * v for s, v in zip(signs, t["values"])]) for t in trials
           if t["state"] == "COMPLETE" and t["values"] and all(math.isfinite(v) for v in t["values"])]
    front = []
    for n, p in pts:
        dominated = any(all(a >= b for a, b in zip(q, p)) and any(a > b for a, b in zip(q, p)) for m, q in pts if m != n)
        if not dominated:
            front.append(n)
    return tuple(sorted(front))


def collect(study, cfg: SweepConfig, *, out: Path, storage: str, seconds: float, workers: int,
            threads: int) -> SweepResult:
    """The :class:`SweepResult` of ``study`` as it stands."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"number": t.number, "state": t.state.name, "params": dict(t.params),
                     "values": list(t.values) if t.values is not None and t.state.name == "COMPLETE" else [],
                     "attrs": dict(t.user_attrs), "interrupted": bool(t.system_attrs.get(INTERRUPTED_ATTR)),
                     "failed_trial": t.system_attrs.get("failed_trial")})
    if len(cfg.objectives) == 1:
        complete = [r for r in rows if r["state"] == "COMPLETE" and r["values"]]
        sign = 1 if cfg.directions[0] == "maximize" else -1
        pareto = (min(complete, key=lambda r: (-sign * r["values"][0], r["number"]))["number"],) if complete else ()
    else:
        pareto = _pareto(rows, cfg.directions)
    return SweepResult(cfg.name, study.study_name, storage, str(out), cfg.objectives, cfg.directions, cfg.param_names,
                       cfg.label, tuple(rows), count_trials(study), pareto, seconds, workers, threads,
                       cfg.total_trials, cfg.label_of)


# ------------------------------------------------------------------------------------------ samplers

def make_sampler(cfg: SweepConfig, k: int):
    """The sampler for the k-th trial, seeded ``seed + k`` (the same suggestion whichever process asks)."""
    import optuna

    seed = cfg.seed + k
    if cfg.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    if cfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=cfg.population_size or 50)
    return optuna.samplers.RandomSampler(seed=seed)


def _pruner(cfg: SweepConfig):
    import optuna

    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup_trials,
                                           n_warmup_steps=cfg.pruner_warmup_epochs)
    return optuna.pruners.NopPruner()


# -------------------------------------------------------------------------------------------- worker

def _read_record(out: Path) -> dict[str, Any]:
    from moco.io import read_json_document

    path = out / "sweep.json"
    if not path.is_file():
        raise MocoError(f"{out} has no sweep.json; start the sweep with 'moco sweep CONFIG --out {out}'")
    return read_json_document(path, format=SWEEP_FORMAT, version=SWEEP_VERSION, what="moco sweep record")


def config_from_record(record: Mapping[str, Any], out: Path) -> SweepConfig:
    """The :class:`SweepConfig` of a sweep folder: ``OUT/sweep.toml`` (the effective file, in its own key order)
    with the ``base_dir`` of ``OUT/sweep.json``, checked against the digest recorded there."""
    import tomllib

    try:
        doc = tomllib.loads((out / "sweep.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise MocoError(f"{out / 'sweep.toml'} cannot be read ({exc}); start the sweep again with 'moco sweep'") from None
    cfg = sweep_from_dict(doc, base_dir=record.get("base_dir"), source=record.get("source"))
    cfg = replace(cfg, quick=bool(record.get("quick")))
    if cfg.digest() != record.get("digest"):
        raise MocoError(f"the sweep's files changed since it started (digest {cfg.digest()} != {record.get('digest')}); "
                        "start it again with 'moco sweep'")
    return cfg


def worker_loop(cfg: SweepConfig, out: Path, spec: StorageSpec, study_name: str, *, tracking: dict | None = None,
                echo: Callable[[str], None] | None = None, on_trial: Callable[[], None] | None = None,
                stale_after: float = STALE_AFTER_S, storage=None) -> int:
    """Claim and run trials of ``study_name`` until none is left; returns how many this process ran."""
    import optuna

    from moco.track.sweep.objective import TrialRunner

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = storage if storage is not None else spec.open()
    study = optuna.load_study(study_name=study_name, storage=storage, pruner=_pruner(cfg))
    lock = StudyLock(spec, storage, study_name)
    runner = TrialRunner(cfg, out, tracking=tracking, echo=echo)
    identity = process_identity()
    distributions = cfg.distributions()
    budget = cfg.n_trials if cfg.sampler != "grid" else None
    if cfg.mode == "train" and _has_work(study, budget):
        runner.load_data()  # a data problem stops the worker before it claims a trial (not one failure per point)
    done = 0
    while True:
        trial = claim_trial(study, lock, distributions=distributions, budget=budget,
                            make_sampler=lambda k: make_sampler(cfg, k), identity=identity, stale_after=stale_after)
        if trial is None:
            return done
        runner.run(study, trial)
        done += 1
        if on_trial is not None:
            on_trial()


def _has_work(study, budget: int | None) -> bool:
    c = count_trials(study)
    return c["waiting"] > 0 or c["running"] > 0 or (budget is not None and c["counted"] < budget)


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies (a killed sweep leaves no orphan worker)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass
    parent = os.environ.get("MOCO_SWEEP_PARENT")
    if parent and os.getppid() != int(parent):
        os._exit(1)  # the parent died before prctl took effect


def worker_main(argv: list[str] | None = None) -> int:
    """Entry of ``python -m moco.track.sweep.worker --out OUT --index I --threads T``; the storage URL, study
    name and tracking come through the environment (a password in a URL stays out of ``ps``)."""
    import argparse

    ap = argparse.ArgumentParser(prog="moco-sweep-worker")
    ap.add_argument("--out", required=True)
    ap.add_argument("--index", type=int, required=True)
    ap.add_argument("--tag", default="worker")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--stale-after", type=float, default=STALE_AFTER_S)
    args = ap.parse_args(argv)
    _die_with_parent()
    import torch

    torch.set_num_threads(max(1, args.threads))
    out = Path(args.out)
    status = out / "workers" / f"{args.tag}-{args.index}.json"
    from moco.io import write_json_atomic

    try:
        record = _read_record(out)
        cfg = config_from_record(record, out)
        spec = parse_storage(os.environ["MOCO_SWEEP_STORAGE"], out)
        tracking = json.loads(os.environ["MOCO_SWEEP_TRACKING"]) if os.environ.get("MOCO_SWEEP_TRACKING") else None
        echo = None if os.environ.get("MOCO_SWEEP_QUIET") else (lambda line: print(line, file=sys.stderr, flush=True))
        done = worker_loop(cfg, out, spec, os.environ["MOCO_SWEEP_STUDY"], tracking=tracking, echo=echo,
                           stale_after=args.stale_after)
        write_json_atomic(status, {"rc": 0, "trials": done, "pid": os.getpid()})
        return 0
    except KeyboardInterrupt:
        return 130
    except (MocoError, ValueError, TypeError, FileNotFoundError) as exc:
        msg = " ".join(str(exc).split()) or type(exc).__name__
        write_json_atomic(status, {"rc": 2, "error": msg, "pid": os.getpid()})
        print(f"moco sweep worker {args.index}: error: {msg}", file=sys.stderr)
        return 2


# ------------------------------------------------------------------------------------------ launcher

def _clean_tmp(out: Path) -> None:
    """Remove half-written trial folders of processes on this host that are gone."""
    from moco.track.sweep.storage import _start_ticks

    trials = out / "trials"
    if not trials.is_dir():
        return
    for p in trials.glob(".*.tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and _start_ticks(int(pid)) is None:
            shutil.rmtree(p, ignore_errors=True)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import moco

    out = {"moco": moco.__version__, "python": platform.python_version()}
    for name in ("torch", "optuna", "numpy", "mlflow", "lightning"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _record(cfg: SweepConfig, spec: StorageSpec, study_name: str, threads: int, workers: int) -> dict[str, Any]:
    if cfg.mode == "pipeline":
        pdoc = cfg.pipeline["doc"]
        data, model = dict(pdoc.get("data") or {}), dict(pdoc.get("model") or {})
    else:
        data, model = {k: v for k, v in cfg.data.items() if v is not None}, {k: v for k, v in cfg.model.items() if v}
    effective = {k: v for k, v in cfg.doc.items() if k != "quick"}
    return json_safe({
        "format": SWEEP_FORMAT, "version": SWEEP_VERSION, "name": cfg.name, "study_name": study_name,
        "storage": spec.display, "directions": list(cfg.directions), "objectives": list(cfg.objectives),
        "sampler": cfg.sampler, "seed": cfg.seed, "quick": cfg.quick, "data": data, "model": model,
        "versions": _versions(), "threads": threads, "workers": workers, "mode": cfg.mode,
        "params": {p.name: p.to_dict() for p in cfg.params}, "label": cfg.label, "total_trials": cfg.total_trials,
        "n_trials": cfg.n_trials, "train": cfg.train, "pruner": cfg.pruner, "digest": cfg.digest(),
        "pipeline": cfg.pipeline["config"] if cfg.pipeline else None, "config": effective,
        "base_dir": cfg.base_dir, "source": cfg.source,
    })


def _check_out_matches(out: Path, study_name: str, spec: StorageSpec) -> None:
    path = out / "sweep.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return
    if old.get("study_name") not in (None, study_name) or old.get("storage") not in (None, spec.display):
        raise MocoError(f"--out {out} holds study {old.get('study_name')!r} in {old.get('storage')}; give another "
                        f"--out for study {study_name!r} in {spec.display}")


def run_sweep(
    config: str | Path | SweepConfig,
    *,
    out: str | Path | None = None,
    workers: int = 1,
    storage: str | None = None,
    study: str | None = None,
    seed: int | None = None,
    quick: bool = False,
    n_trials: int | None = None,
    track: bool = False,
    tracking_uri: str | None = None,
    threads: int | None = None,
    progress: bool = False,
    echo: Callable[[str], None] | None = None,
    stale_after: float = STALE_AFTER_S,
) -> SweepResult:
    """Run (or resume) the sweep of ``config`` (a sweep file or a :class:`SweepConfig`); see the module docstring.

    ``out``: the output folder (default :func:`default_out`); ``storage``: an Optuna storage URL (default
    the journal file ``OUT/study.journal``); ``study``: the study name (default :func:`default_study`);
    ``seed``/``n_trials`` override the file's; ``quick`` applies its ``[quick]`` table; ``track`` logs one
    MLflow run for the sweep and a nested run per trial (at ``tracking_uri``, default as
    :func:`moco.track.resolve_tracking_uri`); ``threads``: torch threads per worker (default
    :func:`worker_threads`: ``max(1, cores // workers)``); ``progress`` shows a bar over the trials; ``echo`` receives a
    line per finished trial when there is no bar. Returns the :class:`SweepResult`.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0 = time.perf_counter()
    if isinstance(config, SweepConfig):
        cfg = config
        if seed is not None or n_trials is not None or quick:
            raise MocoError("seed, n_trials and quick apply to a sweep file; pass the path, or set them in the config")
    else:
        cfg = load_sweep(config, quick=quick, seed=seed, n_trials=n_trials)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise MocoError(f"--workers must be an integer >= 1, got {workers!r}")
    out = Path(out) if out is not None else default_out(cfg)
    out = out.expanduser().resolve()
    study_name = study or default_study(cfg)
    if not isinstance(study_name, str) or not study_name.strip():
        raise MocoError("--study must be a non-empty name")
    spec = parse_storage(storage, out)
    tracking = None
    if track or tracking_uri:
        from moco.track.tracking import resolve_tracking_uri

        tracking = {"tracking_uri": resolve_tracking_uri(tracking_uri or cfg.track.get("tracking_uri")),
                    "experiment": cfg.track.get("experiment", cfg.name), "study": study_name}
    prepare_out_dir(out)
    _check_out_matches(out, study_name, spec)
    optuna_study, storage_obj, lock = open_study(spec, study_name, cfg.directions, digest=cfg.digest())
    with lock:
        if cfg.sampler == "grid":
            enqueue_grid(optuna_study, cfg.grid(), cfg.distributions())
        recover_interrupted(optuna_study, stale_after=stale_after)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise MocoError(f"--threads must be an integer >= 1, got {threads!r}")
    threads = threads or worker_threads(workers)
    from moco.io import write_bytes_atomic, write_json_atomic

    write_bytes_atomic(out / "sweep.toml", dumps_toml({k: v for k, v in cfg.doc.items() if k != "quick"}).encode())
    write_json_atomic(out / "sweep.json", _record(cfg, spec, study_name, threads, workers))
    _clean_tmp(out)

    with contextlib.ExitStack() as scope:
        if tracking is not None:
            from moco.track.tracking import Tracker, log_environment

            parent = scope.enter_context(Tracker(tracking["experiment"], tracking_uri=tracking["tracking_uri"],
                                                 run_name=study_name, tags={"moco.sweep": cfg.name,
                                                                            "optuna.study": study_name}))
            log_environment(parent)
            parent.log_params({"sweep": {k: v for k, v in cfg.to_dict().items() if k not in ("source", "base_dir")},
                               "workers": workers, "threads": threads, "storage": spec.display})
            tracking = {**tracking, "parent_run_id": parent.run_id}
        for _ in range(_MAX_ROUNDS):
            _one_round(cfg, out, spec, study_name, optuna_study, workers, threads, tracking, progress, echo,
                       stale_after, storage_obj)
            with lock:
                recover_interrupted(optuna_study, stale_after=stale_after)
            c = count_trials(optuna_study)
            if not c["waiting"] and (cfg.sampler == "grid" or c["counted"] >= (cfg.n_trials or 0)):
                break
        result = collect(optuna_study, cfg, out=out, storage=spec.display, seconds=time.perf_counter() - t0,
                         workers=workers, threads=threads)
        if tracking is not None:
            b = result.best
            parent.log_metrics({k: v for k, v in result.counts.items()})
            if b is not None:
                parent.log_metrics({f"best.{o}": v for o, v in zip(cfg.objectives, b["values"])})
                parent.set_tags({"best": cfg.label_of(b["params"]), "best.trial": b["number"]})
    write_json_atomic(out / "result.json", result.to_dict())
    return result


def _one_round(cfg, out, spec, study_name, study, workers, threads, tracking, progress, echo, stale_after,
               storage_obj) -> None:
    from tqdm.auto import tqdm

    total = cfg.total_trials
    bar = tqdm(total=total, desc=f"sweep {cfg.name}", unit="trial", disable=not progress, leave=True,
               initial=min(count_trials(study)["finished"], total))

    def refresh() -> None:
        bar.n = min(count_trials(study)["finished"], total)
        bar.refresh()

    def in_process() -> None:
        # this process is worker 0, also in a multi-worker round: a launcher that only waited would cost one
        # more interpreter start (torch, Lightning and Optuna imports: about 4.5 s of CPU) and one data load
        import torch

        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            worker_loop(cfg, out, spec, study_name, tracking=tracking, echo=None if progress else echo,
                        on_trial=refresh, stale_after=stale_after, storage=storage_obj)
        finally:
            torch.set_num_threads(old)

    try:
        if workers == 1:
            in_process()
        else:
            _run_processes(cfg, out, spec, study_name, workers, threads, tracking, quiet=progress or echo is None,
                           poll=refresh, stale_after=stale_after, in_process=in_process)
        refresh()
    finally:
        bar.close()


def _run_processes(cfg, out: Path, spec: StorageSpec, study_name: str, workers: int, threads: int,
                   tracking: dict | None, *, quiet: bool, poll: Callable[[], None], stale_after: float,
                   in_process: Callable[[], None]) -> None:
    """``workers - 1`` worker subprocesses beside ``in_process()`` (worker 0, run here), then wait for them."""
    status = out / "workers"
    status.mkdir(exist_ok=True)
    tag = f"{os.getpid()}-{time.time_ns()}"  # status files of this launcher's round (another may share OUT)
    env = {**os.environ, "MOCO_SWEEP_STORAGE": spec.url, "MOCO_SWEEP_STUDY": study_name,
           "MOCO_SWEEP_PARENT": str(os.getpid()), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.pop("MOCO_SWEEP_TRACKING", None)
    env.pop("MOCO_SWEEP_QUIET", None)
    if tracking is not None:
        env["MOCO_SWEEP_TRACKING"] = json.dumps(tracking)
    if quiet:
        env["MOCO_SWEEP_QUIET"] = "1"
    root = str(Path(__file__).resolve().parents[3])  # the folder holding the moco package
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    procs = [subprocess.Popen([sys.executable, "-m", "moco.track.sweep.worker", "--out", str(out), "--index", str(i),
                               "--tag", tag, "--threads", str(threads), "--stale-after", str(stale_after)], env=env)
             for i in range(1, workers)]
    try:
        in_process()
        while any(p.poll() is None for p in procs):
            time.sleep(0.5)
            poll()
    except KeyboardInterrupt:
        for p in procs:  # the workers got Ctrl-C too: wait for them to mark their trials interrupted
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    errors, crashed = [], []
    for i, p in enumerate(procs, start=1):
        path = status / f"{tag}-{i}.json"
        info = json.loads(path.read_text()) if path.is_file() else {}
        if info.get("rc") == 2:
            errors.append(info.get("error", "unknown error"))
        elif p.returncode != 0:
            crashed.append(f"worker {i} (pid {p.pid}) exited with code {p.returncode}")
        path.unlink(missing_ok=True)
    if errors:
        raise MocoError(errors[0])
    for line in crashed:  # worker 0 (this process) went on; the crashed one's trial is re-run once (found interrupted)
        print(f"moco sweep: warning: {line}", file=sys.stderr)
