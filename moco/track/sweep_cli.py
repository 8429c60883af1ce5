"""Run an Optuna sweep from a sweep file (a grid, TPE or NSGA-II over model, training or compression settings) in N worker processes sharing one study; the same command again resumes it (finished trials kept, interrupted ones re-run once). Prints the trials sorted by the first objective and the best (or the Pareto front); the last stdout line is JSON.

``moco sweep CONFIG.toml [--out OUT] [--workers N] [--storage URL] [--study NAME] [--seed S] [--quick]
[--n-trials N] [--track] [--tracking-uri URI] [--no-progress]``: see :mod:`moco.track.sweep` and
``examples/sweeps/``.
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``moco sweep`` options."""
    parser.add_argument("config", help="the sweep file (TOML; see examples/sweeps/)")
    parser.add_argument("--out", default=None,
                        help="output folder (default moco-out/sweeps/<name>, <name>-quick with --quick)")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes on this machine sharing the study, each with cores//N torch threads "
                             "(default 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per worker (default: cores // workers, at least 1)")
    parser.add_argument("--storage", default=None,
                        help="Optuna storage: postgresql://user@host:port/db (many machines), sqlite:///file.db or "
                             "journal:FILE (default: the journal file OUT/study.journal)")
    parser.add_argument("--study", default=None, help="study name (default: the sweep's name, -quick with --quick)")
    parser.add_argument("--seed", type=int, default=None, help="sweep seed (default: the file's, else 0)")
    parser.add_argument("--quick", action="store_true", help="apply the file's [quick] overrides (a small, fast run)")
    parser.add_argument("--n-trials", type=int, default=None, help="trials to run (tpe, nsga2, random; not grid)")
    parser.add_argument("--track", action="store_true",
                        help="log to MLflow: one run for the sweep, a nested run per trial")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (implies --track; default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (it is shown only when stderr is a terminal)")


def main(args: argparse.Namespace) -> int:
    """Run the sweep; 0 when at least one trial is complete (or pruned), 1 when every trial failed."""
    from moco.track.sweep import run_sweep

    progress = not args.no_progress and sys.stderr.isatty()
    result = run_sweep(args.config, out=args.out, workers=args.workers, storage=args.storage, study=args.study,
                       seed=args.seed, quick=args.quick, n_trials=args.n_trials, track=args.track,
                       tracking_uri=args.tracking_uri, threads=args.threads, progress=progress,
                       echo=lambda line: print(line, file=sys.stderr, flush=True))
    print(result.to_text())
    print(json.dumps(result.summary(), sort_keys=True))
    c = result.counts
    if c["trials"] and not (c["complete"] or c["pruned"]):
        print("moco: error: every trial failed; see the errors above (and trials/NNNN/error.txt)", file=sys.stderr)
        return 1
    return 0
