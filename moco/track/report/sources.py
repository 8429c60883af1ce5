"""Where a report's trials come from: a sweep folder, an Optuna storage + study, or an MLflow experiment.

Every source becomes one :class:`TrialSource`: the objectives and their directions, one :class:`Trial` per
Optuna trial or MLflow run (state, objective values, metrics, swept parameters, error) and a loader for a
trial's artifacts (``history.json``, ``predictions.npz``, ``config.toml``), called only for the trials a
report shows in detail.

* sweep folder (``moco sweep --out OUT``): ``OUT/sweep.json`` names the storage (``journal:PATH`` for the
  default Optuna journal file, or an RDB URL) and the study; artifacts are read from ``OUT/trials/NNNN/``.
* ``--storage URL --study NAME``: any Optuna storage (``journal:PATH``, a journal file path, ``sqlite:///``,
  ``postgresql://``); artifacts only where a sweep folder is given too (the trials' ``artifacts`` attribute
  is relative to it); curves still come from the ``history`` user attribute.
* ``--tracking-uri URI --experiment NAME``: the experiment's runs through ``mlflow.MlflowClient``; a run
  that is the parent of others (the sweep's own run) is not a trial. Run params are the parameters (numbers
  parsed back from MLflow's strings), run metrics the metrics; ``history.json``, ``predictions.npz`` and
  ``config.toml`` are downloaded when logged at the run root, else the curves come from the metric histories.

Nothing here unpickles: JSON, TOML and ``np.load(allow_pickle=False)`` only.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from moco.errors import MocoError

__all__ = ["Trial", "TrialDetail", "TrialSource", "default_direction", "from_mlflow", "from_storage",
           "from_sweep_folder", "load_predictions", "open_source", "parse_param_value"]

SWEEP_FORMAT = "moco.sweep"
#: metric columns of a trial, in table order (the contract's user attributes; MLflow metrics of the same names)
METRIC_COLUMNS = ("test_accuracy", "test_loss", "train_accuracy", "train_loss", "val_accuracy", "train_seconds",
                  "epochs", "stopped", "macs", "param_count", "latency_ms")
_MINIMIZE_WORDS = ("loss", "macs", "flops", "param", "seconds", "time", "latency", "error", "bytes", "energy")


def default_direction(name: str) -> str:
    """``"minimize"`` for names that read as a cost (loss, MACs, FLOPs, params, seconds, time, latency,
    error, bytes, energy), else ``"maximize"`` (accuracy, agreement, coverage, ...)."""
    low = name.lower()
    return "minimize" if any(w in low for w in _MINIMIZE_WORDS) else "maximize"


def parse_param_value(text: Any) -> Any:
    """MLflow stores params as strings: ``"5" -> 5``, ``"0.01" -> 0.01``, ``"True" -> True``; others unchanged."""
    if not isinstance(text, str):
        return text
    s = text.strip()
    if s.lower() in ("true", "false"):
        return s.lower() == "true"
    if re.fullmatch(r"[+-]?\d+", s):
        return int(s)
    try:
        value = float(s)
    except ValueError:
        return text
    return value


@dataclass(frozen=True)
class Trial:
    """One trial (Optuna) or run (MLflow).

    ``state`` is Optuna's name (``COMPLETE``, ``PRUNED``, ``FAIL``, ``RUNNING``, ``WAITING``); MLflow's
    FINISHED maps to COMPLETE, FAILED/KILLED to FAIL. ``values`` maps objective names to values (only for
    complete trials), ``metrics`` the other recorded figures, ``params`` the swept parameters under their
    sweep-file names. ``artifacts`` is the trial's folder when known; ``run_id`` its MLflow run; ``history``
    the per-epoch records kept with the trial (Optuna user attribute); ``seed`` the trial's own seed.
    """

    number: int
    state: str
    values: Mapping[str, float]
    metrics: Mapping[str, Any]
    params: Mapping[str, Any]
    error: str | None = None
    artifacts: Path | None = None
    run_id: str | None = None
    history: tuple[Mapping[str, Any], ...] | None = None
    seed: int | None = None


@dataclass(frozen=True)
class TrialDetail:
    """A trial's per-epoch history (list of dicts), its predictions (see :func:`load_predictions`) and the
    text of its ``config.toml``, each None when not recorded; ``notes`` say what could not be read."""

    history: tuple[Mapping[str, Any], ...] | None
    predictions: Mapping[str, np.ndarray] | None
    config_text: str | None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrialSource:
    """The trials of one study or experiment and how to read their artifacts.

    ``kind`` is ``"sweep"``, ``"optuna"`` or ``"mlflow"``; ``location`` the folder, storage URL or
    tracking URI; ``name`` the study or experiment; ``objectives``/``directions`` the study's (for MLflow:
    the chosen objective); ``meta`` what the source records about itself (``sweep.json``, storage, URI);
    ``sweep_toml`` the effective sweep file's text when known; ``fixed_params`` parameters every MLflow run
    shares (settings, not swept).
    """

    kind: str
    location: str
    name: str
    objectives: tuple[str, ...]
    directions: tuple[str, ...]
    trials: tuple[Trial, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)
    sweep_toml: str | None = None
    fixed_params: Mapping[str, Any] = field(default_factory=dict)
    loader: Callable[[Trial], TrialDetail] | None = field(default=None, compare=False, repr=False)

    def detail(self, trial: Trial) -> TrialDetail:
        """The trial's artifacts (read now)."""
        if self.loader is None:
            return TrialDetail(trial.history, None, None)
        return self.loader(trial)


# --------------------------------------------------------------------------------------------- artifacts

def load_predictions(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a ``predictions.npz`` of the sweep contract, checked: ``y_true``/``y_pred`` int [N],
    ``sample_index`` int [M] (positions in ``y_true``), ``sample_images`` float [M, C, H, W] in [0, 1],
    ``class_names`` str [K] (optional). Raises MocoError naming the file and the problem."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except ValueError as exc:  # object arrays need pickle: refused
        raise MocoError(f"{path}: cannot read safely ({exc}); store class_names as a str array") from None
    except (OSError, EOFError) as exc:
        raise MocoError(f"{path} is not a readable .npz file ({exc})") from None
    missing = [k for k in ("y_true", "y_pred") if k not in arrays]
    if missing:
        raise MocoError(f"{path} lacks {', '.join(missing)} (expected y_true, y_pred, sample_index, sample_images)")
    y_true, y_pred = np.asarray(arrays["y_true"]).reshape(-1), np.asarray(arrays["y_pred"]).reshape(-1)
    if len(y_true) != len(y_pred) or not (np.issubdtype(y_true.dtype, np.integer)
                                          and np.issubdtype(y_pred.dtype, np.integer)):
        raise MocoError(f"{path}: y_true and y_pred must be integer arrays of one length, got "
                        f"{y_true.dtype}[{len(y_true)}] and {y_pred.dtype}[{len(y_pred)}]")
    out = {"y_true": y_true.astype(np.int64), "y_pred": y_pred.astype(np.int64)}
    if "sample_index" in arrays or "sample_images" in arrays:
        index = np.asarray(arrays.get("sample_index", np.zeros(0, np.int64))).reshape(-1)
        images = np.asarray(arrays.get("sample_images", np.zeros((0, 1, 1, 1), np.float32)))
        if images.ndim == 3:
            images = images[:, None]
        if images.ndim != 4 or len(images) != len(index):
            raise MocoError(f"{path}: sample_images must be [M, C, H, W] with one row per sample_index entry, got "
                            f"{list(images.shape)} for {len(index)} indices")
        if len(index) and (index.min() < 0 or index.max() >= len(y_true)):
            raise MocoError(f"{path}: sample_index must lie in 0..{len(y_true) - 1}")
        out["sample_index"] = index.astype(np.int64)
        out["sample_images"] = np.clip(np.nan_to_num(images.astype(np.float32)), 0.0, 1.0)
    if "class_names" in arrays:
        out["class_names"] = np.asarray(arrays["class_names"]).astype(str).reshape(-1)
    return out


def _read_history(path: Path) -> tuple[dict, ...]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MocoError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(doc, list) or not all(isinstance(r, dict) for r in doc):
        raise MocoError(f"{path} must be a JSON list of per-epoch objects")
    return tuple(doc)


def _folder_detail(trial: Trial) -> TrialDetail:
    """History, predictions and config of a trial folder (history falls back to the user attribute)."""
    notes: list[str] = []
    history, predictions, config = trial.history, None, None
    folder = trial.artifacts
    if folder is not None and folder.is_dir():
        if (folder / "history.json").is_file():
            try:
                history = _read_history(folder / "history.json")
            except MocoError as exc:
                notes.append(str(exc))
        if (folder / "predictions.npz").is_file():
            try:
                predictions = load_predictions(folder / "predictions.npz")
            except MocoError as exc:
                notes.append(str(exc))
        if (folder / "config.toml").is_file():
            config = (folder / "config.toml").read_text()
    elif folder is not None:
        notes.append(f"trial folder {folder} not found")
    return TrialDetail(history, predictions, config, tuple(notes))


# ------------------------------------------------------------------------------------------------ optuna

def _journal_path(url: str, base: Path | None) -> Path | None:
    """The file of a ``journal:PATH`` URL or a bare journal path; relative paths are tried against the
    working directory, then the sweep folder (which may have moved since), then its ``study.journal``."""
    if url.startswith("journal:"):
        text = url[len("journal:"):]
        if text.startswith("//"):
            text = text[2:]
    elif "://" not in url:
        text = url
    else:
        return None
    path = Path(text).expanduser()
    candidates = [path]
    if not path.is_absolute() and base is not None:
        candidates.append(base / path)
    if base is not None:
        candidates.append(base / path.name)
    for c in candidates:
        if c.is_file():
            return c
    raise MocoError(f"Optuna journal file {path} not found" + (f" (nor in {base})" if base else "")
                    + "; give the sweep's --out folder or the right --storage")


def _open_storage(url: str, base: Path | None = None):
    """An Optuna storage for ``url`` opened for reading (no tables or files are created)."""
    import optuna

    journal = _journal_path(url, base)
    if journal is not None:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(str(journal))), f"journal:{journal}"
    scheme = url.split("://", 1)[0].split("+", 1)[0].lower()
    if scheme not in ("sqlite", "postgresql", "postgres", "mysql", "oracle", "mssql"):
        raise MocoError(f"storage {url!r} is not an Optuna storage URL; use journal:PATH, sqlite:///FILE or "
                        "postgresql://USER@HOST/DB")
    if scheme == "sqlite":
        db = url.split(":///", 1)[-1]
        if db and db != ":memory:" and not Path(db).is_file():
            raise MocoError(f"Optuna SQLite storage {db} not found; check --storage")
    try:
        storage = optuna.storages.RDBStorage(url, skip_table_creation=True, skip_compatibility_check=True)
    except Exception as exc:  # sqlalchemy raises many types (driver missing, refused, bad URL)
        msg = " ".join(str(exc).split())[:300]
        raise MocoError(f"cannot open Optuna storage {url!r}: {msg}; check --storage (with the password, or set "
                        "PGPASSWORD)") from None
    return storage, url


def _study_names(storage) -> list[str]:
    try:
        return sorted(s.study_name for s in storage.get_all_studies())
    except Exception as exc:  # an RDB without optuna's tables
        msg = " ".join(str(exc).split())[:200]
        raise MocoError(f"the storage holds no Optuna studies ({msg})") from None


def _trial_from_optuna(t, objectives: Sequence[str], root: Path | None) -> Trial:
    attrs = dict(t.user_attrs)
    state = t.state.name
    values: dict[str, float] = {}
    if state == "COMPLETE" and t.values is not None:
        values = {name: float(v) for name, v in zip(objectives, t.values)}
    metrics = {}
    for key in METRIC_COLUMNS:
        src = "params" if key == "param_count" else key
        if src in attrs and not isinstance(attrs[src], (dict, list)):
            metrics[key] = attrs[src]
    if "mlflow_run_id" in attrs:
        metrics["mlflow_run_id"] = attrs["mlflow_run_id"]
    artifacts = None
    if root is not None:
        rel = attrs.get("artifacts")
        artifacts = root / rel if isinstance(rel, str) and rel else root / "trials" / f"{t.number:04d}"
    history = attrs.get("history")
    history = tuple(h for h in history if isinstance(h, dict)) if isinstance(history, list) else None
    error = attrs.get("error")
    if error is None and state == "FAIL":
        error = t.system_attrs.get("fail_reason") if hasattr(t, "system_attrs") else None
    return Trial(number=int(t.number), state=state, values=values, metrics=metrics, params=dict(t.params),
                 error=None if error is None else " ".join(str(error).split()), artifacts=artifacts,
                 run_id=attrs.get("mlflow_run_id"), history=history,
                 seed=attrs.get("seed") if isinstance(attrs.get("seed"), int) else None)


def from_storage(storage_url: str, study_name: str | None, *, folder: Path | None = None,
                 meta: Mapping[str, Any] | None = None, sweep_toml: str | None = None) -> TrialSource:
    """The trials of ``study_name`` in an Optuna storage. ``folder`` (a sweep folder) locates artifacts;
    ``meta`` is its ``sweep.json`` (objective names). Without a study name the storage must hold one study."""
    import optuna

    storage, location = _open_storage(storage_url, folder)
    names = _study_names(storage)
    if study_name is None:
        if len(names) != 1:
            raise MocoError(f"storage {location} holds {len(names)} studies ({', '.join(names) or 'none'}); "
                            "choose one with --study NAME")
        study_name = names[0]
    if study_name not in names:
        raise MocoError(f"study {study_name!r} not found in {location}; it holds: {', '.join(names) or 'no studies'}")
    study = optuna.load_study(study_name=study_name, storage=storage)
    meta = dict(meta or {})
    directions = tuple(d.name.lower() for d in study.directions)
    objectives = list(meta.get("objectives") or study.metric_names or [])
    if len(objectives) != len(directions):
        objectives = ["value"] if len(directions) == 1 else [f"objective_{i}" for i in range(len(directions))]
    trials = tuple(_trial_from_optuna(t, objectives, folder) for t in study.get_trials(deepcopy=False))
    meta.setdefault("storage", location)
    return TrialSource(kind="sweep" if folder is not None else "optuna",
                       location=str(folder) if folder is not None else location, name=study_name,
                       objectives=tuple(objectives), directions=directions, trials=trials, meta=meta,
                       sweep_toml=sweep_toml, loader=_folder_detail)


def from_sweep_folder(folder: str | os.PathLike, *, storage: str | None = None, study: str | None = None) -> TrialSource:
    """The trials of the sweep written to ``folder`` (``moco sweep ... --out folder``)."""
    from moco.io import read_json_document

    folder = Path(folder)
    if not folder.exists():
        raise MocoError(f"{folder} does not exist; give a sweep's --out folder (moco sweep CONFIG --out DIR), "
                        "--storage URL --study NAME, or --tracking-uri URI --experiment NAME")
    if not folder.is_dir() or not (folder / "sweep.json").is_file():
        raise MocoError(f"{folder} is not a sweep folder (no sweep.json in it); give the --out folder of "
                        "moco sweep, or --storage URL --study NAME")
    meta = read_json_document(folder / "sweep.json", format=SWEEP_FORMAT, what="moco sweep record")
    url = storage or meta.get("storage") or "journal:study.journal"
    if storage is None and ":***@" in url:
        # sweep.json records a database URL with the password masked: connect without it (libpq then reads
        # PGPASSWORD or ~/.pgpass); --storage gives the full URL
        url = url.replace(":***@", "@")
    sweep_toml = (folder / "sweep.toml").read_text() if (folder / "sweep.toml").is_file() else None
    return from_storage(url, study or meta.get("study_name") or meta.get("name"), folder=folder, meta=meta,
                        sweep_toml=sweep_toml)


# ------------------------------------------------------------------------------------------------ mlflow

_STATES = {"FINISHED": "COMPLETE", "FAILED": "FAIL", "KILLED": "FAIL", "RUNNING": "RUNNING", "SCHEDULED": "WAITING"}
SWEPT_PREFIX = "swept."
_NUMBER_TAGS = ("trial", "trial_number", "optuna.trial_number", "optuna.trial.number", "moco.trial")


def _resolve_tracking_uri(uri: str | None) -> str:
    try:  # the tracking module's resolver (same defaults and checks as every --track command)
        from moco.track.tracking import resolve_tracking_uri
    except ImportError:
        resolve_tracking_uri = None
    if resolve_tracking_uri is not None:
        return resolve_tracking_uri(uri)
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if "://" not in uri and not uri.startswith("file:"):
        uri = Path(uri).expanduser().resolve().as_uri()
    return uri


def _check_store_exists(uri: str) -> None:
    """A report reads: a local store that does not exist is a mistake (MLflow would create an empty one)."""
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///"):]
        if not Path(db).is_file():
            raise MocoError(f"MLflow store {db} not found; give --tracking-uri of the store the runs were logged to")
    elif uri.startswith("file:"):
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        path = Path(url2pathname(urlparse(uri).path))
        if not path.is_dir():
            raise MocoError(f"MLflow store folder {path} not found; give --tracking-uri of the store the runs were logged to")


def _mlflow_history(client, run_id: str, keys: Sequence[str]) -> tuple[dict, ...] | None:
    """Per-epoch history from the metric histories (step = epoch) of the usual per-epoch names.

    A run's final metrics are logged without a step, i.e. at step 0, after the epochs: a step-0 value logged
    after the last epoch's is that final value, not epoch 0's, and is left out; of two values at one step
    the first logged is kept.
    """
    per_step: dict[int, dict] = {}
    for key in keys:
        hist = sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)
        if not hist:
            continue
        last_step = max(int(m.step) for m in hist)
        last_time = max(m.timestamp for m in hist if int(m.step) == last_step)
        for m in hist:
            step = int(m.step)
            if step == 0 and last_step > 0 and m.timestamp > last_time:
                continue
            row = per_step.setdefault(step, {"epoch": step})
            row.setdefault(key, float(m.value))
    if not per_step:
        return None
    return tuple(per_step[s] for s in sorted(per_step))


class _no_mlflow_bars:
    """MLflow's artifact download bars off for the block (its environment switch, restored after)."""

    KEY = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"

    def __enter__(self):
        self._old = os.environ.get(self.KEY)
        os.environ[self.KEY] = "false"

    def __exit__(self, *exc):
        if self._old is None:
            os.environ.pop(self.KEY, None)
        else:
            os.environ[self.KEY] = self._old


def _shared(params: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The parameters every run has with one value."""
    keys = sorted({k for p in params for k in p})
    out = {}
    for k in keys:
        if all(k in p for p in params) and len({json.dumps(p[k], sort_keys=True, default=str) for p in params}) == 1:
            out[k] = params[0][k]
    return out


def from_mlflow(experiment: str, *, tracking_uri: str | None = None, objective: str = "test_accuracy",
                direction: str | None = None) -> TrialSource:
    """The runs of MLflow experiment ``experiment`` as trials (parent runs of nested runs are not trials)."""
    import mlflow

    uri = _resolve_tracking_uri(tracking_uri)
    _check_store_exists(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    try:
        exp = client.get_experiment_by_name(experiment)
        names = None if exp is not None else sorted(e.name for e in client.search_experiments())
    except Exception as exc:  # connection refused, bad store
        raise MocoError(f"cannot read MLflow tracking store {uri}: {' '.join(str(exc).split())[:300]}") from None
    if exp is None:
        raise MocoError(f"MLflow experiment {experiment!r} not found at {uri}; it has: {', '.join(names) or 'none'}")
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token, order_by=["attributes.start_time ASC"])
        runs.extend(page)
        token = page.token
        if not token:
            break
    parents = {r.data.tags.get("mlflow.parentRunId") for r in runs} - {None}
    trial_runs = [r for r in runs if r.info.run_id not in parents]
    parent_runs = [r for r in runs if r.info.run_id in parents]
    all_params = [{k: parse_param_value(v) for k, v in r.data.params.items()} for r in trial_runs]
    seeds = [p.get("seed") if isinstance(p.get("seed"), int) else None for p in all_params]
    if any(k.startswith(SWEPT_PREFIX) for p in all_params for k in p):
        # moco sweep logs the swept point under "swept.<name>" and its settings beside it
        swept_params = [{k[len(SWEPT_PREFIX):]: v for k, v in p.items() if k.startswith(SWEPT_PREFIX)} for p in all_params]
        settings = [{k: v for k, v in p.items() if not k.startswith(SWEPT_PREFIX) and k != "seed"} for p in all_params]
        fixed = _shared(settings)
    else:  # runs logged some other way: the params that differ between runs are the swept ones
        fixed = _shared(all_params) if len(trial_runs) > 1 else {}
        swept_params = [{k: v for k, v in p.items() if k not in fixed and k not in _NUMBER_TAGS} for p in all_params]
    numbers = []
    for i, r in enumerate(trial_runs):
        num = next((r.data.tags[t] for t in _NUMBER_TAGS if t in r.data.tags), None)
        if num is None:
            num = next((r.data.params[t] for t in _NUMBER_TAGS if t in r.data.params), None)
        if num is None and r.info.run_name:
            m = re.search(r"(\d+)$", r.info.run_name)
            num = m.group(1) if m else None
        try:
            numbers.append(int(num))
        except (TypeError, ValueError):
            numbers.append(None)
    if None in numbers or len(set(numbers)) != len(numbers):
        numbers = list(range(len(trial_runs)))  # start order
    direction = direction or default_direction(objective)
    trials = []
    for num, run, swept, seed in zip(numbers, trial_runs, swept_params, seeds):
        state = _STATES.get(run.info.status, run.info.status)
        metrics = dict(run.data.metrics)
        if "params" in metrics and "param_count" not in metrics:
            metrics["param_count"] = metrics.pop("params")
        if "training_time" in metrics and "train_seconds" not in metrics:
            metrics["train_seconds"] = metrics["training_time"]
        value = metrics.get(objective)
        values = {objective: float(value)} if state == "COMPLETE" and value is not None else {}
        trials.append(Trial(number=num, state=state, values=values, metrics=metrics, params=swept,
                            error=run.data.tags.get("error"), run_id=run.info.run_id, seed=seed))
    sweep_toml = None
    with _no_mlflow_bars():
        for p in parent_runs:
            try:
                names_ = {a.path for a in client.list_artifacts(p.info.run_id)}
                if "sweep.toml" in names_:
                    with tempfile.TemporaryDirectory() as tmp:
                        sweep_toml = Path(client.download_artifacts(p.info.run_id, "sweep.toml", tmp)).read_text()
                    break
            except Exception:  # an artifact store that cannot be read: the report says there is no config
                continue

    def loader(trial: Trial) -> TrialDetail:
        with _no_mlflow_bars():
            return _load(trial)

    def _load(trial: Trial) -> TrialDetail:
        notes: list[str] = []
        history = predictions = config = None
        try:
            names_ = {a.path for a in client.list_artifacts(trial.run_id)}
        except Exception as exc:
            names_ = set()
            notes.append(f"cannot list artifacts of run {trial.run_id}: {' '.join(str(exc).split())[:200]}")
        with tempfile.TemporaryDirectory() as tmp:
            if "history.json" in names_:
                try:
                    history = _read_history(Path(client.download_artifacts(trial.run_id, "history.json", tmp)))
                except MocoError as exc:
                    notes.append(str(exc))
            if "predictions.npz" in names_:
                try:
                    predictions = load_predictions(client.download_artifacts(trial.run_id, "predictions.npz", tmp))
                except MocoError as exc:
                    notes.append(str(exc))
            if "config.toml" in names_:
                config = Path(client.download_artifacts(trial.run_id, "config.toml", tmp)).read_text()
        if history is None:
            history = _mlflow_history(client, trial.run_id, ("loss", "train_loss", "train_accuracy", "val_accuracy",
                                                            "test_accuracy", "test_loss"))
        return TrialDetail(history, predictions, config, tuple(notes))

    return TrialSource(kind="mlflow", location=uri, name=experiment, objectives=(objective,),
                       directions=(direction,), trials=tuple(sorted(trials, key=lambda t: t.number)),
                       meta={"tracking_uri": uri, "experiment_id": exp.experiment_id,
                             "parent_runs": [p.info.run_id for p in parent_runs]},
                       sweep_toml=sweep_toml, fixed_params=fixed, loader=loader)


def open_source(source: str | os.PathLike | None = None, *, storage: str | None = None, study: str | None = None,
                tracking_uri: str | None = None, experiment: str | None = None,
                objective: str | None = None) -> TrialSource:
    """The :class:`TrialSource` for the report command's arguments (see the module docstring)."""
    if experiment is not None:
        if source is not None or storage is not None:
            raise MocoError("give either an MLflow experiment (--experiment) or a sweep folder / --storage, not both")
        return from_mlflow(experiment, tracking_uri=tracking_uri, objective=objective or "test_accuracy")
    if tracking_uri is not None and source is None and storage is None:
        raise MocoError("--tracking-uri needs --experiment NAME (the MLflow experiment to report)")
    if source is not None:
        return from_sweep_folder(source, storage=storage, study=study)
    if storage is not None:
        return from_storage(storage, study)
    raise MocoError("nothing to report: give a sweep folder, --storage URL --study NAME, or "
                    "--tracking-uri URI --experiment NAME")
