"""HTML report of a sweep (its --out folder), an Optuna study (--storage URL --study NAME) or an MLflow
experiment (--tracking-uri URI --experiment NAME): the trials sorted by the objective, Pareto plots of test
accuracy against MACs and training time, parameter effects, curves and error grids, the best configuration.

Prints the table and the best configuration; the last stdout line is JSON: {"report", "trials", "complete",
"failed", "pruned", "pareto_size", "best"}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["add_arguments", "default_out", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``moco report`` arguments."""
    parser.add_argument("source", nargs="?", default=None,
                        help="a sweep's --out folder (holds sweep.json); omit with --storage or --experiment")
    parser.add_argument("--out", default=None,
                        help="a folder (report.html, PNGs, best_config.toml, report.json) or a file NAME.html "
                             "(default: SOURCE/report, else moco-out/reports/NAME)")
    parser.add_argument("--storage", default=None,
                        help="Optuna storage: journal:PATH, sqlite:///FILE, postgresql://USER@HOST/DB")
    parser.add_argument("--study", default=None, help="Optuna study name (default: the sweep's, or the only one)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment whose runs are the trials")
    parser.add_argument("--objective", default=None,
                        help="what sorts the table and picks the best (default: the study's first objective; "
                             "MLflow: test_accuracy)")
    parser.add_argument("--trial", type=int, action="append", default=[], metavar="N",
                        help="also show curves and the error grid of trial N (repeatable)")
    parser.add_argument("--top", type=int, default=1, metavar="K",
                        help="curves and error grids for the K best trials (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the strip plots' jitter (default 0)")


def default_out(args: argparse.Namespace, name: str) -> Path:
    """``SOURCE/report`` for a sweep folder, else ``moco-out/reports/NAME``."""
    if args.source is not None:
        return Path(args.source) / "report"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "report"
    return Path("moco-out") / "reports" / safe


def main(args: argparse.Namespace) -> int:
    """Build the report, write it, print the table and the JSON summary line."""
    from moco.track.report import build_report

    report = build_report(args.source, storage=args.storage, study=args.study, tracking_uri=args.tracking_uri,
                          experiment=args.experiment, objective=args.objective, trials=args.trial,
                          top=args.top, seed=args.seed)
    out = Path(args.out) if args.out else default_out(args, report.source.name)
    path = report.write_html(out)
    print(report.to_text())
    print(f"report: {path}")
    print(json.dumps(report.summary(path)))
    return 0
