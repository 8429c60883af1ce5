"""``SweepReport``: a sweep's or an experiment's trials as one table, Pareto fronts, effect plots, per-run
curves and error grids, the best configuration, and one self-contained HTML page.

:func:`build_report` reads a source (see :mod:`moco.track.report.sources`) and computes everything except
the pictures; :meth:`SweepReport.figures` draws them and :meth:`SweepReport.write_html` writes the page
(images embedded as data URIs) and, for a folder, the PNGs, ``best_config.toml`` and ``report.json`` beside it.

The front named ``pareto`` is the non-dominated set of the study's objectives when it has two or more; with
one objective it is the front of test accuracy against MACs (the seed's Pareto plot). The two figures are
always test accuracy against MACs and against training time, each with its own 2-D front.
"""

from __future__ import annotations

import datetime as _dt
import functools
import math
import os
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from moco.errors import MocoError
from moco.results import ResultProtocol, frame_text, json_safe

from .config import fixed_sweep_config, params_text, toml_dumps
from .sources import METRIC_COLUMNS, Trial, TrialSource, default_direction, open_source
from .plots import curves_figure, effects_figure, error_grid_figure, pareto_figure, pareto_mask

__all__ = ["REPORT_FORMAT", "RunView", "SweepReport", "build_report"]

REPORT_FORMAT = "moco.report"
TIME_COLUMNS = ("train_seconds", "training_time", "seconds")
#: MLflow metrics that are not a trial's figures: the last per-epoch values (``loss`` is ``train_loss``) and
#: bookkeeping; other metrics a run has become table columns
_BOOKKEEPING = {"mlflow_run_id", "epoch", "epoch_seconds", "loss", "seconds", "seed", "worker_pid", "params"}
_STATE_ORDER = {"COMPLETE": 0, "PRUNED": 1, "FAIL": 2, "RUNNING": 3, "WAITING": 4}


@dataclass(frozen=True)
class RunView:
    """One trial shown in detail: its parameters in the seed's style, history (per-epoch dicts), predictions
    (``predictions.npz`` arrays) and notes on what could not be read."""

    number: int
    state: str
    params_text: str
    history: tuple[Mapping[str, Any], ...] | None
    predictions: Mapping[str, np.ndarray] | None = field(default=None, repr=False)
    notes: tuple[str, ...] = ()


def _human(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return ""
    v = float(value)
    for unit in ("", "K", "M", "G", "T"):
        if abs(v) < 1000 or unit == "T":
            return (f"{v:.0f}" if unit == "" and v == int(v) else f"{v:.3g}") + unit
        v /= 1000.0
    return str(value)  # pragma: no cover


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("moco", "optuna", "mlflow", "matplotlib", "numpy", "pandas"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


@dataclass(frozen=True, eq=False)
class SweepReport(ResultProtocol):
    """The report of one study or experiment (result protocol: ``to_text``, ``to_dict``, ``to_frame``).

    ``frame`` has one row per trial, sorted: complete trials by ``objective`` (best first; ties by the other
    objectives, then trial number), then pruned, failed and running ones. Columns: ``trial``, ``state``,
    the objectives, ``front`` (on the ``pareto`` front), the swept parameters under their sweep-file names,
    the metrics recorded (accuracies, losses, ``train_seconds``, ``macs``, ``param_count``, ...), ``error``
    (and ``run_id`` for MLflow).
    ``pareto``/``pareto_macs``/``pareto_time`` are trial numbers on the fronts (see the module docstring);
    ``best`` the first trial of the table; ``best_config`` the TOML that reproduces it (``config_origin``
    says where it came from, or why there is none); ``runs`` the trials shown in detail.
    """

    source: TrialSource
    objective: str
    direction: str
    frame: Any
    params: tuple[str, ...]
    pareto: tuple[int, ...]
    pareto_macs: tuple[int, ...]
    pareto_time: tuple[int, ...]
    best: int | None
    best_config: str | None
    config_origin: str
    runs: tuple[RunView, ...]
    accuracy_column: str | None
    time_column: str | None
    settings: Mapping[str, Any]

    # ------------------------------------------------------------------------------------ the protocol
    def counts(self) -> dict[str, int]:
        """Number of trials per state."""
        return {str(k): int(v) for k, v in self.frame["state"].value_counts().sort_index().items()}

    def best_trial(self) -> Trial | None:
        return next((t for t in self.source.trials if t.number == self.best), None)

    def to_frame(self):
        """The trial table (a copy)."""
        return self.frame.copy()

    def display_frame(self, *, error_width: int = 60):
        """The trial table formatted for reading: fractions to 4 decimals, MACs and parameter counts as
        ``1.2M``, seconds to 0.1 s, the front as ``*``, errors cut to ``error_width`` characters (no error
        column when no trial failed)."""
        df = self.frame.copy()
        if "error" in df and not df["error"].map(lambda v: isinstance(v, str) and bool(v)).any():
            df = df.drop(columns="error")
        for col in df.columns:
            if col in ("macs", "param_count") or (col in self.source.objectives and "macs" in col):
                df[col] = [_human(v) for v in df[col]]
            elif col in ("train_seconds", "training_time") or col.endswith("seconds"):
                df[col] = [f"{v:.1f}" if _finite(v) else "" for v in df[col]]
            elif col == "latency_ms":
                df[col] = [f"{v:.3g}" if _finite(v) else "" for v in df[col]]
            elif col in self.params:
                df[col] = ["" if v is None or (isinstance(v, float) and math.isnan(v))
                           else f"{v:.4g}" if isinstance(v, float) else str(v) for v in df[col]]
            elif col == "front":
                df[col] = ["*" if v else "" for v in df[col]]
            elif col == "error":
                df[col] = [("" if not isinstance(v, str) else v if len(v) <= error_width
                            else v[: error_width - 3] + "...") for v in df[col]]
            elif col in ("trial", "epochs"):
                df[col] = [str(int(v)) if _finite(v) else "" for v in df[col]]
            elif df[col].dtype.kind == "f":
                df[col] = [f"{v:.4f}" if _finite(v) and abs(v) < 1e4 else (_human(v) if _finite(v) else "")
                           for v in df[col]]
            else:
                df[col] = ["" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v) for v in df[col]]
        return df

    def to_dict(self) -> dict[str, Any]:
        best = self.best_trial()
        src = self.source
        return json_safe({
            "format": REPORT_FORMAT, "version": 1, "kind": src.kind, "source": src.location, "name": src.name,
            "objective": self.objective, "direction": self.direction, "objectives": list(src.objectives),
            "directions": list(src.directions), "trials": len(self.frame), "states": self.counts(),
            "params": list(self.params), "pareto": list(self.pareto), "pareto_size": len(self.pareto),
            "pareto_macs": list(self.pareto_macs), "pareto_time": list(self.pareto_time),
            "best": None if best is None else {
                "trial": best.number, **{k: v for k, v in best.values.items()},
                "metrics": {k: v for k, v in best.metrics.items()}, "params": dict(best.params),
                "params_text": params_text(best.params), "run_id": best.run_id},
            "config_origin": self.config_origin,
            "runs": [{"trial": r.number, "epochs": len(r.history or ()), "predictions": r.predictions is not None,
                      "notes": list(r.notes)} for r in self.runs],
            "fixed_params": dict(src.fixed_params), "meta": dict(src.meta), "settings": dict(self.settings),
            "table": self.frame.to_dict(orient="records"),
        })

    def to_text(self) -> str:
        src = self.source
        counts = self.counts()
        what = {"sweep": "sweep", "optuna": "Optuna study", "mlflow": "MLflow experiment"}[src.kind]
        lines = [f"{what} {src.name} ({src.location}): {len(self.frame)} trials ("
                 + ", ".join(f"{n} {s.lower()}" for s, n in counts.items()) + ")",
                 "objectives: " + ", ".join(f"{o} ({d})" for o, d in zip(src.objectives, src.directions))
                 + f"; sorted by {self.objective} ({self.direction})", ""]
        lines.append(frame_text(self.display_frame()))
        lines.append("")
        acc = self.accuracy_column or self.objective
        if self.pareto_macs:
            lines.append(f"Pareto front ({acc} vs MACs): " + ", ".join(f"#{n}" for n in self.pareto_macs))
        if self.pareto_time:
            lines.append(f"Pareto front ({acc} vs {self.time_column}): " + ", ".join(f"#{n}" for n in self.pareto_time))
        if len(src.objectives) > 1:
            lines.append(f"Pareto front ({', '.join(src.objectives)}): " + ", ".join(f"#{n}" for n in self.pareto))
        best = self.best_trial()
        if best is None:
            lines.append("best: none (no complete trial with " + self.objective + ")")
        else:
            figures = ", ".join(f"{k} {_fmt_metric(k, v)}" for k, v in _headline(best, self).items())
            lines.append(f"best: trial {best.number}: {figures}")
            lines.append(params_text(best.params))
            lines.append(f"config: {self.config_origin}")
        return "\n".join(lines)

    def summary(self, report_path: str | os.PathLike | None = None) -> dict[str, Any]:
        """The CLI's last-line JSON: report path, trials, states, pareto_size, best."""
        best = self.best_trial()
        return json_safe({
            "report": None if report_path is None else str(report_path), "trials": len(self.frame),
            "complete": self.counts().get("COMPLETE", 0), "failed": self.counts().get("FAIL", 0),
            "pruned": self.counts().get("PRUNED", 0), "pareto_size": len(self.pareto),
            "best": None if best is None else {"trial": best.number, **_headline(best, self),
                                               "params": dict(best.params)},
        })

    # ------------------------------------------------------------------------------------------ figures
    def complete(self):
        """Rows of complete trials with a finite objective (the plotted ones), in table order."""
        df = self.frame
        return df[(df["state"] == "COMPLETE") & np.isfinite(df[self.objective].astype(float))]

    def figures(self) -> dict[str, bytes | None]:
        """PNG bytes by file name: ``pareto_macs.png``, ``pareto_time.png``, ``effects.png``,
        ``curves_NNNN.png`` and ``errors_NNNN.png`` per detailed run; None where there is nothing to draw.
        Drawn once per report (the drawing is deterministic) and reused by every write."""
        return dict(self._figures)

    @functools.cached_property
    def _figures(self) -> dict[str, bytes | None]:
        done = self.complete()
        out: dict[str, bytes | None] = {}
        acc = self.accuracy_column or self.objective
        acc_dir = default_direction(acc) if acc != self.objective else self.direction
        for name, col, label, front in (("pareto_macs.png", "macs", "MACs per sample", self.pareto_macs),
                                        ("pareto_time.png", self.time_column, "training time (s)", self.pareto_time)):
            if col is None or col not in done or not np.isfinite(done[col].astype(float)).any():
                out[name] = None
                continue
            rows = done[np.isfinite(done[col].astype(float)) & np.isfinite(done[acc].astype(float))]
            out[name] = pareto_figure(rows[col].astype(float), rows[acc].astype(float), rows["trial"].astype(int),
                                      rows["trial"].isin(front), xlabel=label, ylabel=acc,
                                      title=f"{acc} vs {label}: {len(rows)} trials, front of {len(front)}",
                                      best=self.best, y_direction=acc_dir, x_engineering=col == "macs")
        out["effects.png"] = effects_figure({p: done[p].tolist() for p in self.params if p in done},
                                            done[self.objective].astype(float).tolist(),
                                            objective_name=self.objective, seed=int(self.settings.get("seed", 0)))
        for run in self.runs:
            out[f"curves_{run.number:04d}.png"] = (curves_figure(run.history, title=f"trial {run.number}: "
                                                                 + params_text(_params_of(self, run.number)).replace("\n", "  "))
                                                   if run.history else None)
            out[f"errors_{run.number:04d}.png"] = (error_grid_figure(run.predictions, title=f"trial {run.number}")
                                                   if run.predictions is not None else None)
        return out

    def write_html(self, path: str | os.PathLike) -> Path:
        """Write the report. ``path`` ending in ``.html``: that one self-contained file. Otherwise a folder
        with ``report.html`` (self-contained too), the PNGs, ``best_config.toml`` and ``report.json``.
        Every file is written atomically; returns the HTML file's path."""
        from moco.io import write_bytes_atomic, write_json_atomic

        from .html import render_html

        path = Path(path)
        single = path.suffix.lower() in (".html", ".htm")
        if single and path.is_dir():
            raise MocoError(f"{path} is a folder; give a file name ending in .html or a folder without the suffix")
        if not single and path.exists() and not path.is_dir():
            raise MocoError(f"{path} exists and is not a folder; give a folder or a file name ending in .html")
        images = self.figures()
        page = render_html(self, images)
        if single:
            return write_bytes_atomic(path, page.encode())
        path.mkdir(parents=True, exist_ok=True)
        for name, data in images.items():
            if data is not None:
                write_bytes_atomic(path / name, data)
        if self.best_config is not None:
            write_bytes_atomic(path / "best_config.toml", self.best_config.encode())
        write_json_atomic(path / "report.json", self.to_dict())
        return write_bytes_atomic(path / "report.html", page.encode())


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(float(v))


def _fmt_metric(name: str, v: Any) -> str:
    if not _finite(v):
        return str(v)
    if "macs" in name or name == "param_count":
        return _human(v)
    if "seconds" in name or name == "training_time":
        return f"{float(v):.1f} s"
    return f"{float(v):.4g}"


def _headline(trial: Trial, report: SweepReport) -> dict[str, Any]:
    """Objective values and the usual figures of a trial (accuracy, MACs, time) for the summary lines."""
    out = dict(trial.values)
    for key in (report.accuracy_column, "macs", report.time_column, "param_count"):
        if key and key not in out and _finite(trial.metrics.get(key)):
            out[key] = trial.metrics[key]
    return {k: int(v) if ("macs" in k or k == "param_count") and _finite(v) and float(v).is_integer() else v
            for k, v in out.items()}


def _params_of(report: SweepReport, number: int) -> Mapping[str, Any]:
    return next((t.params for t in report.source.trials if t.number == number), {})


def _trial_frame(source: TrialSource):
    import pandas as pd

    params: list[str] = []
    for t in source.trials:
        params += [p for p in t.params if p not in params]
    metrics = [m for m in METRIC_COLUMNS if any(m in t.metrics for t in source.trials)]
    extra = sorted({m for t in source.trials for m in t.metrics if m not in METRIC_COLUMNS and m not in _BOOKKEEPING
                    and _finite(t.metrics[m]) and m not in source.objectives}) if source.kind == "mlflow" else []
    rows = []
    for t in source.trials:
        row: dict[str, Any] = {"trial": t.number, "state": t.state}
        for o in source.objectives:
            row[o] = t.values.get(o, t.metrics.get(o) if t.state == "COMPLETE" and o in t.metrics else np.nan)
        for m in metrics + extra:
            if m not in source.objectives:
                row[m] = t.metrics.get(m, np.nan)
        for p in params:
            row[p] = t.params.get(p)
        row["error"] = t.error
        if source.kind == "mlflow":
            row["run_id"] = t.run_id
        rows.append(row)
    df = pd.DataFrame(rows, columns=["trial", "state", *source.objectives, *params,
                                     *[m for m in metrics + extra if m not in source.objectives], "error",
                                     *(["run_id"] if source.kind == "mlflow" else [])])
    for col in df.columns:
        if col in ("trial", "state", "error", "run_id", "stopped") or col in params:
            continue
        df[col] = pd.to_numeric(df[col], errors="coerce")
    return df, tuple(params)


def _sorted(df, keys: Sequence[tuple[str, str]]):
    done = (df["state"] == "COMPLETE") & np.isfinite(df[keys[0][0]].astype(float))
    order_cols, asc = [], []
    head = df[done].copy()
    for col, direction in keys:
        head[f"__{col}"] = head[col].astype(float)
        order_cols.append(f"__{col}")
        asc.append(direction == "minimize")
    head = head.sort_values(order_cols + ["trial"], ascending=asc + [True], kind="stable", na_position="last")
    head = head.drop(columns=order_cols)
    tail = df[~done].copy()
    tail["__s"] = [_STATE_ORDER.get(s, 9) for s in tail["state"]]
    tail = tail.sort_values(["__s", "trial"], kind="stable").drop(columns="__s")
    import pandas as pd

    return pd.concat([head, tail], ignore_index=True)


def _front(df, cols: Sequence[str], directions: Sequence[str]) -> tuple[int, ...]:
    if any(c is None or c not in df for c in cols):
        return ()
    sub = df[(df["state"] == "COMPLETE")]
    values = sub[list(cols)].astype(float).to_numpy()
    mask = pareto_mask(values, directions)
    return tuple(int(n) for n in sub["trial"][mask])


def build_report(source: TrialSource | str | os.PathLike | None = None, *, storage: str | None = None,
                 study: str | None = None, tracking_uri: str | None = None, experiment: str | None = None,
                 objective: str | None = None, trials: Sequence[int] = (), top: int = 1,
                 seed: int = 0) -> SweepReport:
    """The report of a sweep folder, an Optuna ``storage`` + ``study`` or an MLflow ``experiment``.

    ``objective`` sorts the table and picks the best (default: the study's first objective; for MLflow
    ``test_accuracy``); ``top`` best complete trials and the ``trials`` given get curves and error grids;
    ``seed`` fixes the strip plots' jitter.
    """
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise MocoError(f"top must be a whole number >= 0, got {top!r}")
    src = source if isinstance(source, TrialSource) else open_source(
        source, storage=storage, study=study, tracking_uri=tracking_uri, experiment=experiment, objective=objective)
    if not src.trials:
        raise MocoError(f"{src.name} ({src.location}) has no trials yet; run the sweep first")
    df, params = _trial_frame(src)
    objective = objective or src.objectives[0]
    if objective in src.objectives:
        direction = src.directions[src.objectives.index(objective)]
    elif objective in df.columns and df[objective].dtype.kind in "fiu":
        direction = default_direction(objective)
    else:
        numeric = [c for c in df.columns if df[c].dtype.kind in "fiu" and c != "trial"]
        raise MocoError(f"objective {objective!r} is not recorded; choose one of: {', '.join(numeric)}")
    keys = [(objective, direction)] + [(o, d) for o, d in zip(src.objectives, src.directions) if o != objective]
    df = _sorted(df, keys)
    acc = "test_accuracy" if "test_accuracy" in df and np.isfinite(df["test_accuracy"].astype(float)).any() else objective
    acc_dir = direction if acc == objective else default_direction(acc)
    time_col = next((c for c in TIME_COLUMNS if c in df and np.isfinite(df[c].astype(float)).any()), None)
    pareto_macs = _front(df, [acc, "macs"], [acc_dir, "minimize"]) if "macs" in df else ()
    pareto_time = _front(df, [acc, time_col], [acc_dir, "minimize"]) if time_col else ()
    if len(src.objectives) > 1:
        pareto = _front(df, list(src.objectives), list(src.directions))
    else:
        pareto = pareto_macs or _front(df, [objective], [direction])
    df.insert(2 + len(src.objectives), "front", df["trial"].isin(pareto))
    done = df[(df["state"] == "COMPLETE") & np.isfinite(df[objective].astype(float))]
    best = int(done["trial"].iloc[0]) if len(done) else None
    numbers = {t.number for t in src.trials}
    missing = [n for n in trials if n not in numbers]
    if missing:
        raise MocoError(f"trial {missing[0]} is not in {src.name}; its trials are {min(numbers)}..{max(numbers)}")
    detail_numbers = list(dict.fromkeys([int(n) for n in done["trial"].iloc[:top]] + [int(n) for n in trials]))
    by_number = {t.number: t for t in src.trials}
    runs, details = [], {}
    for n in detail_numbers:
        d = src.detail(by_number[n])
        details[n] = d
        runs.append(RunView(number=n, state=by_number[n].state, params_text=params_text(by_number[n].params),
                            history=d.history, predictions=d.predictions, notes=d.notes))
    best_config, origin = None, "no complete trial"
    if best is not None:
        d = details.get(best) or src.detail(by_number[best])
        if d.config_text is not None:
            best_config = d.config_text
            origin = (f"trials/{best:04d}/config.toml" if src.kind != "mlflow"
                      else f"config.toml of run {by_number[best].run_id}")
        elif src.sweep_toml is not None:
            trial_seed = by_number[best].seed
            doc = fixed_sweep_config(src.sweep_toml, by_number[best].params, trial=best, seed=trial_seed)
            best_config = toml_dumps(doc, header=f"trial {best} of {src.name}: the sweep file with every swept "
                                     "parameter fixed to the trial's value"
                                     + (f" and the trial's seed {trial_seed}" if trial_seed is not None else
                                        " (the trial's own seed is not recorded: the sweep's is kept)")
                                     + "\nrun: moco sweep best_config.toml")
            origin = "sweep.toml with the swept parameters fixed (the trial's config.toml is missing)"
        else:
            origin = "none: the trial has no config.toml and the sweep file is not recorded"
    settings = {"seed": seed, "top": top, "trials": list(trials), "objective": objective,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "versions": _versions()}
    return SweepReport(source=src, objective=objective, direction=direction, frame=df, params=params,
                       pareto=pareto, pareto_macs=pareto_macs, pareto_time=pareto_time, best=best,
                       best_config=best_config, config_origin=origin, runs=tuple(runs), accuracy_column=acc,
                       time_column=time_col, settings=settings)
