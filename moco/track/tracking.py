"""MLflow tracking for every moco workflow: one :class:`Tracker` per MLflow run.

::

    from moco.track import Tracker, log_environment

    with Tracker("fashion", run_name="cnn-3x3", tracking_uri=None) as t:   # sqlite:///<cwd>/mlflow.db
        log_environment(t)                              # versions, threads, platform as tags
        t.log_params({"model": {"spec": "mynet.py:Net", "args": {"width": 16}}, "lr": 1e-3})   # model.args.width
        fit(model, data, epochs=3, on_epoch=t.epoch_callback())      # loss, train_accuracy, ... at step=epoch
        t.log_metrics({"test_accuracy": 0.91, "macs": 2.3e6, "latency_ms": 0.41})
        t.log_model(model, arch={"spec": "mynet.py:Net", "args": {"width": 16}})   # model/state_dict.pt + arch.json

Where runs go (:func:`resolve_tracking_uri`): the ``tracking_uri`` argument (``--tracking-uri``), else
``$MLFLOW_TRACKING_URI``, else MLflow's own embedded default, ``sqlite:///mlflow.db`` in the working
directory (nothing to start; artifacts in ``mlruns/`` beside a SQLite database). Any MLflow store works: a folder, ``sqlite:///``,
``postgresql://``/``mysql://``, ``http(s)://`` of an ``mlflow server``, ``databricks``. A bad URI (unknown
scheme, no host, a missing folder, a server that does not answer within a few seconds) is a
:class:`~moco.errors.MocoError` naming the fix, raised before any work starts.

Everything goes through an explicit ``mlflow.MlflowClient(tracking_uri)``: no global active run, no
``mlflow.set_tracking_uri``, so several trackers (a pipeline run and its nested step runs, sweep trials
in worker processes) never step on each other. MLflow's own logging is sent to stderr at WARNING and its
"View run at" lines go to stderr, so the last stdout line of ``moco run`` and of benchmarks stays JSON.
Query the runs back with MLflow's own client (``MlflowClient(uri).search_runs(...)``) or UI
(``mlflow ui --backend-store-uri sqlite:///mlflow.db``).

Per-epoch metrics (:meth:`Tracker.log_epoch`): an ``EpochLog`` / ``ExitEpochLog`` / dict becomes metrics
at ``step=epoch``: ``loss``, ``train_accuracy``, ``val_accuracy`` (fractions; per exit
``train_accuracy.0``, ``train_accuracy.1``, ...), ``epoch_seconds`` (the epoch's ``seconds``) and any
other numeric field under its own name. Training code deep inside a workflow reports epochs with
:func:`notify_epoch`; :func:`observe_epochs` routes them to a tracker for the duration of a block.

This module imports MLflow only when a tracker is made (``import moco.track`` stays cheap).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import numbers
import os
import re
import socket
import ssl
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import urlparse

from moco.errors import MocoError

__all__ = ["DEFAULT_TRACKING_URI", "MODEL_FORMAT", "RunTracking", "Tracker", "flatten", "load_state_dict",
           "log_benchmark_result", "log_environment", "notify_epoch", "observe_epochs", "resolve_tracking_uri", "save_model_files",
           "track_benchmark"]

#: MLflow's embedded default store (a SQLite file in the working directory; nothing to start)
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
#: the ``format`` field of the ``arch.json`` that :meth:`Tracker.log_model` writes beside the weights
MODEL_FORMAT = "moco.track.model/1"

_PROBE_TIMEOUT_S = 3.0
_DB_SCHEMES = {"sqlite", "postgresql", "postgres", "mysql", "mssql"}
_DB_PORTS = {"postgresql": 5432, "postgres": 5432, "mysql": 3306, "mssql": 1433}
_REMOTE_SCHEMES = {"databricks", "databricks-uc", "uc"}
_URI_HELP = ("use sqlite:///path/mlflow.db, postgresql://user@host/db, http://host:port (an 'mlflow server'), "
             "databricks, or a folder (with MLFLOW_ALLOW_FILE_STORE=true)")
# MLflow's limits (mlflow.utils.validation): key length, param/tag value length, entities per log_batch
_MAX_KEY, _MAX_PARAM, _MAX_TAG = 250, 6000, 8000
_MAX_METRICS_PER_BATCH, _MAX_PARAMS_TAGS_PER_BATCH = 1000, 100
_KEY_BAD = re.compile(r"[^/\w.\- :]")


# ------------------------------------------------------------------------------------------ the URI

def _source(uri: str | None) -> tuple[str | None, str]:
    if uri is not None and str(uri).strip():
        return str(uri).strip(), "--tracking-uri"
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env, "MLFLOW_TRACKING_URI"
    return None, "default"


def _plugin_schemes() -> set[str]:
    """Schemes of tracking-store plugins installed through MLflow's ``mlflow.tracking_store`` entry point."""
    from importlib.metadata import entry_points

    try:
        return {ep.name for ep in entry_points(group="mlflow.tracking_store")}
    except Exception:  # noqa: BLE001 - a broken plugin's metadata must not break tracking
        return set()


def _probe_tcp(host: str, port: int, what: str, uri: str, fix: str) -> None:
    try:
        with socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise MocoError(f"{what} {uri!r}: cannot connect to {host}:{port} ({reason}); {fix}") from None


def _probe_http(uri: str, what: str) -> None:
    """A GET of ``URI/health`` (what ``mlflow server`` answers) within a few seconds; any HTTP answer
    (even 401/404) means something listens, only no answer at all is an error."""
    url = uri.rstrip("/") + "/health"
    fix = ("start the server (mlflow server --host 127.0.0.1 --port PORT) or fix the address; "
           "without --tracking-uri runs go to sqlite:///mlflow.db here")
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=_PROBE_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ssl.SSLError):
            return  # something speaks TLS there; certificates are MLflow's to check (MLFLOW_TRACKING_INSECURE_TLS)
        reason = getattr(reason, "strerror", None) or str(reason) or type(exc).__name__
        raise MocoError(f"{what} {uri!r}: no MLflow server answers at {url} within {_PROBE_TIMEOUT_S:g} s "
                        f"({reason}); {fix}") from None


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The MLflow tracking URI to use, checked: ``uri`` > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///<cwd>/mlflow.db``.

    A plain path becomes a URI: a ``*.db`` file a ``sqlite:///`` store, anything else a folder store
    (``file:///abs/path``; MLflow 3 opens those only with ``MLFLOW_ALLOW_FILE_STORE=true``). Relative ``sqlite:///`` and folder paths are made absolute (a later change of
    directory does not move the store). Raises MocoError naming the fix for an unknown scheme, a URI
    without host or path, a missing parent folder, a path that is a file where a folder is needed, a
    database host that refuses TCP connections, or an ``http(s)`` server that does not answer within
    3 s (no MLflow retry loop of minutes).
    """
    raw, where = _source(uri)
    what = {"--tracking-uri": "tracking URI", "MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI",
            "default": "default tracking URI"}[where]
    if raw is None:
        return "sqlite:///" + str(Path.cwd().resolve() / "mlflow.db")
    if any(ch in raw for ch in "\n\r\t") or ("://" in raw and any(c.isspace() for c in raw.split("://", 1)[0])):
        raise MocoError(f"{what} {raw!r} is malformed (whitespace in it); {_URI_HELP}")
    if raw.split(":", 1)[0].lower() in _REMOTE_SCHEMES:  # "databricks", "databricks://profile", "uc:..."
        return raw
    parsed = urlparse(raw)
    scheme = parsed.scheme.lower()
    if not scheme or (len(scheme) == 1 and os.name == "nt"):  # a path (or a Windows drive letter)
        path = Path(raw).expanduser().resolve()
        if path.suffix == ".db":
            return _sqlite_uri(path, raw, what)
        return _folder_uri(path, raw, what)
    if "://" not in raw:
        raise MocoError(f"{what} {raw!r} is malformed (expected SCHEME://...); {_URI_HELP}")
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise MocoError(f"{what} {raw!r}: a file: URI names a local folder (file:///abs/folder), not host "
                            f"{parsed.netloc!r}")
        if not parsed.path:
            raise MocoError(f"{what} {raw!r} has no folder; give file:///abs/folder")
        from urllib.request import url2pathname

        return _folder_uri(Path(url2pathname(parsed.path)).resolve(), raw, what)
    base = scheme.split("+", 1)[0]
    if base == "sqlite":
        if not raw.lower().startswith(("sqlite:///", "sqlite+")) or parsed.netloc:
            raise MocoError(f"{what} {raw!r} is malformed; a SQLite store is sqlite:///relative/mlflow.db or "
                            "sqlite:////abs/path/mlflow.db (three or four slashes)")
        db = raw.split(":///", 1)[1] if ":///" in raw else ""
        if not db or db.startswith(":memory:") or db.startswith("?"):
            raise MocoError(f"{what} {raw!r} names no database file; give sqlite:///path/mlflow.db")
        db_path, _, query = db.partition("?")
        return _sqlite_uri(Path(db_path).expanduser().resolve(), raw, what, scheme=scheme, query=query)
    if base in _DB_SCHEMES:
        if not parsed.hostname and "host=" not in parsed.query:
            raise MocoError(f"{what} {raw!r} names no database host; give {base}://user:password@host:port/database")
        if not parsed.path.strip("/"):
            raise MocoError(f"{what} {raw!r} names no database; give {base}://user:password@host:port/database")
        if parsed.hostname:
            try:
                port = parsed.port or _DB_PORTS[base]
            except ValueError:
                raise MocoError(f"{what} {raw!r} has a bad port; give {base}://user@host:port/database") from None
            _probe_tcp(parsed.hostname, port, what, raw, "start the database server or fix the host and port")
        return raw
    if scheme in ("http", "https"):
        if not parsed.hostname:
            raise MocoError(f"{what} {raw!r} names no host; give {scheme}://host:port of an 'mlflow server'")
        try:
            parsed.port
        except ValueError:
            raise MocoError(f"{what} {raw!r} has a bad port; give {scheme}://host:port") from None
        _probe_http(raw, what)
        return raw.rstrip("/")
    if scheme in _plugin_schemes():
        return raw
    raise MocoError(f"{what} {raw!r}: unknown scheme {parsed.scheme!r}; {_URI_HELP}")


def _folder_uri(path: Path, raw: str, what: str) -> str:
    if path.exists() and not path.is_dir():
        raise MocoError(f"{what} {raw!r}: {path} is a file, not a folder; give a folder for a file store or "
                        "sqlite:///path/mlflow.db for a database")
    if not path.parent.is_dir():
        raise MocoError(f"{what} {raw!r}: the folder {path.parent} does not exist; create it or give another path")
    if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() not in ("true", "1"):
        # MLflow 3 keeps folder stores in maintenance mode and refuses to open one without this opt-in
        raise MocoError(f"{what} {raw!r} is a folder store, which MLflow opens only with MLFLOW_ALLOW_FILE_STORE=true;"
                        f" use sqlite:///{path / 'mlflow.db'} (a database in that folder) or set the variable")
    return path.as_uri()


def _sqlite_uri(path: Path, raw: str, what: str, *, scheme: str = "sqlite", query: str = "") -> str:
    if path.is_dir():
        raise MocoError(f"{what} {raw!r}: {path} is a folder; give the database file, e.g. sqlite:///{path}/mlflow.db")
    if not path.parent.is_dir():
        raise MocoError(f"{what} {raw!r}: the folder {path.parent} does not exist; create it or give another path")
    return f"{scheme}:///{path}" + (f"?{query}" if query else "")


# ------------------------------------------------------------------------------------------ MLflow

_CLIENTS: dict[str, Any] = {}
_QUIET = False


def _quiet_mlflow() -> None:
    """MLflow's and alembic's log records at WARNING and up only (once per process, after ``import mlflow``,
    which configures its loggers: they already write to stderr)."""
    global _QUIET
    if _QUIET:
        return
    import mlflow  # noqa: F401 - its import sets the "mlflow" logger to INFO; override that after it

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    _QUIET = True


def _client(uri: str):
    """One ``MlflowClient`` per URI and process: a SQLite store migrates its tables once, on first use."""
    client = _CLIENTS.get(uri)
    if client is None:
        _quiet_mlflow()
        from mlflow import MlflowClient

        try:
            client = MlflowClient(tracking_uri=uri)
            client._tracking_client.store  # noqa: B018 - open the store now (migrations), errors here, not mid-run
        except Exception as exc:  # noqa: BLE001 - MLflow and SQLAlchemy raise many kinds for one cause
            raise MocoError(f"cannot open the MLflow tracking store {uri!r}: {_one_line(exc)}; fix --tracking-uri "
                            "or MLFLOW_TRACKING_URI") from None
        _CLIENTS[uri] = client
    return client


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:300] + "...") if len(text) > 300 else (text or type(exc).__name__)


def _artifact_location(uri: str) -> str | None:
    """For a SQLite store, ``mlruns/`` beside the database file (a ``file:`` URI); else the store's default.

    MLflow's own default for a database store is ``./mlruns`` of whatever directory the process runs in,
    so the same ``sqlite:////abs/mlflow.db`` would scatter artifacts over every working directory it is
    used from. Beside the database, they stay with the runs they belong to (for the default
    ``sqlite:///mlflow.db`` in the working directory it is the same place as MLflow's).
    """
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):])
    if str(db) in ("", ":memory:"):
        return None
    return (db.resolve().parent / "mlruns").as_uri()


def _experiment_id(client, name: str, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    if not isinstance(name, str) or not name.strip():
        raise MocoError(f"experiment name must be a non-empty string, got {name!r}")
    for attempt in range(3):
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage != "active":
                raise MocoError(f"MLflow experiment {name!r} at {uri} is deleted; restore it (mlflow experiments "
                                f"restore --experiment-id {exp.experiment_id}) or give another --experiment")
            return exp.experiment_id
        try:
            return client.create_experiment(name, artifact_location=_artifact_location(uri))
        except MlflowException as exc:  # another process created it between the two calls
            if attempt == 2 or "already exists" not in str(exc).lower() and "unique" not in str(exc).lower():
                raise MocoError(f"cannot create MLflow experiment {name!r} at {uri}: {_one_line(exc)}") from None
    raise AssertionError("unreachable")  # pragma: no cover


def _default_tags() -> dict[str, str]:
    """The tags MLflow's fluent ``start_run`` would add (user, source, git commit), else user + source."""
    try:
        from mlflow.tracking.context.registry import resolve_tags

        tags = dict(resolve_tags())
    except Exception:  # noqa: BLE001 - context providers are best effort in MLflow too
        tags = {}
    import getpass

    try:
        tags.setdefault("mlflow.user", getpass.getuser())
    except Exception:  # noqa: BLE001 - no user name in some containers
        pass
    tags["mlflow.source.name"] = " ".join(sys.argv) if sys.argv and sys.argv[0] else "moco"
    tags.setdefault("mlflow.source.type", "LOCAL")
    return {k: str(v)[:_MAX_TAG] for k, v in tags.items()}


# -------------------------------------------------------------------------------------- flattening

def _key(key: str) -> str:
    """A name MLflow accepts: allowed characters only, no empty / '.' / '..' parts, at most 250 characters."""
    key = _KEY_BAD.sub("_", str(key))
    parts = [p for p in key.split("/") if p not in ("", ".", "..")]
    key = "/".join(parts) or "_"
    return key[:_MAX_KEY]


def _scalar(value: Any) -> float | None:
    """``value`` as a finite float, or None when it is not a number (bools count as 0/1)."""
    if not isinstance(value, numbers.Real) and callable(getattr(value, "item", None)):
        try:
            value = value.item()  # numpy / torch scalars and one-element arrays
        except (ValueError, RuntimeError, TypeError):
            return None
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    return None


def flatten(obj: Any, *, sep: str = ".", lists: str = "index", max_list: int = 100) -> dict[str, Any]:
    """Nested mappings as one flat dict with ``a.b.c`` keys.

    ``lists="index"`` flattens lists and tuples too (``a.0``, ``a.1``; lists longer than ``max_list`` are
    left out: they are data, kept in the JSON artifacts); ``lists="keep"`` keeps a list of plain values as
    one value and indexes only lists holding mappings (a config's ``steps.0.method``). Dataclasses and
    objects with ``to_dict()`` are flattened as their dicts.
    """
    if lists not in ("index", "keep"):
        raise ValueError(f"lists must be 'index' or 'keep', got {lists!r}")
    out: dict[str, Any] = {}

    def walk(value: Any, key: str) -> None:
        if is_dataclass(value) and not isinstance(value, type):
            value = asdict(value)
        elif not isinstance(value, Mapping) and hasattr(value, "to_dict") and callable(value.to_dict):
            value = value.to_dict()
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, f"{key}{sep}{k}" if key else str(k))
            return
        if isinstance(value, (list, tuple)):
            nested = any(isinstance(v, (Mapping, list, tuple)) or is_dataclass(v) for v in value)
            if lists == "keep" and not nested:
                out[key] = list(value)
                return
            if len(value) > max_list:
                return
            for i, v in enumerate(value):
                walk(v, f"{key}{sep}{i}" if key else str(i))
            return
        out[key] = value

    walk(obj, "")
    return out


def _param_text(value: Any) -> str:
    from moco.results import json_safe

    text = value if isinstance(value, str) else json.dumps(json_safe(value), sort_keys=True)
    return text if len(text) <= _MAX_PARAM else text[: _MAX_PARAM - 3] + "..."


def _epoch_dict(log: Any) -> dict[str, Any]:
    if is_dataclass(log) and not isinstance(log, type):
        return asdict(log)
    if isinstance(log, Mapping):
        return dict(log)
    if hasattr(log, "to_dict") and callable(log.to_dict):
        return dict(log.to_dict())
    if hasattr(log, "__dict__"):
        return {k: v for k, v in vars(log).items() if not k.startswith("_")}
    raise TypeError(f"an epoch log must be an EpochLog, ExitEpochLog, dataclass or dict, got {type(log).__name__}")


# ----------------------------------------------------------------------------------- epoch observers

_OBSERVERS: contextvars.ContextVar[tuple[Callable[[Any], None], ...]] = contextvars.ContextVar(
    "moco_epoch_observers", default=())


@contextlib.contextmanager
def observe_epochs(callback: Callable[[Any], None]) -> Iterator[Callable[[Any], None]]:
    """Within the block, every :func:`notify_epoch` (training code reporting a finished epoch) calls
    ``callback(log)`` too; blocks nest (every active callback is called, innermost last)."""
    if not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    token = _OBSERVERS.set(_OBSERVERS.get() + (callback,))
    try:
        yield callback
    finally:
        _OBSERVERS.reset(token)


def notify_epoch(log: Any) -> None:
    """Hand a finished epoch (an ``EpochLog``-like object or dict) to the callbacks of the enclosing
    :func:`observe_epochs` blocks; does nothing outside them (one context-variable lookup)."""
    for callback in _OBSERVERS.get():
        callback(log)


# ---------------------------------------------------------------------------------------- the model

def save_model_files(model, folder: str | Path, *, arch: Mapping | None = None) -> Path:
    """Write ``folder/state_dict.safetensors`` (if ``safetensors`` is installed) else ``folder/state_dict.pt``
    (``torch.save`` of tensors only, read back with ``weights_only=True``), then ``folder/arch.json``
    (format, ``arch``, model class, parameter count, every tensor's shape and dtype, the sized layers);
    each atomically. Returns the folder."""
    import torch

    from moco.io import atomic_path, write_json_atomic
    from moco.results import json_safe

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if arch is not None and not isinstance(arch, Mapping):
        raise TypeError(f"arch must be a dict (e.g. {{'spec': ..., 'args': {{...}}}}), got {type(arch).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state, skipped = {}, []
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            state[key] = value.detach().to("cpu").contiguous().clone()
        else:
            skipped.append(key)
    try:
        from safetensors.torch import save_file
    except ImportError:  # not a moco dependency: torch.save of plain tensors is just as safe to load
        save_file = None
    weights = folder / ("state_dict.safetensors" if save_file else "state_dict.pt")
    with atomic_path(weights) as tmp:
        if save_file:
            save_file(state, str(tmp))
        else:
            torch.save(state, tmp)
    try:
        from moco.compress.surgery.modules import describe_module

        layers = {n: d for n, m in model.named_modules() if (d := describe_module(m)) is not None}
    except Exception:  # noqa: BLE001 - the layer sizes are a convenience; the weights and arch are the record
        layers = {}
    desc = {"format": MODEL_FORMAT, "arch": json_safe(dict(arch)) if arch is not None else None,
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "parameters": int(sum(p.numel() for p in model.parameters())), "weights": weights.name,
            "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in state.items()},
            "skipped_non_tensors": skipped, "layers": layers, "torch": str(torch.__version__)}
    write_json_atomic(folder / "arch.json", desc)
    return folder


def load_state_dict(folder: str | Path) -> dict:
    """The tensors :func:`save_model_files` / :meth:`Tracker.log_model` wrote (a downloaded artifact folder or
    its weights file), read safely: safetensors, or ``torch.load(weights_only=True)``; never unpickled."""
    path = Path(folder)
    if path.is_dir():
        found = [path / n for n in ("state_dict.safetensors", "state_dict.pt") if (path / n).is_file()]
        if not found:
            raise MocoError(f"{path} holds no state_dict.safetensors or state_dict.pt; give a folder logged by "
                            "Tracker.log_model")
        path = found[0]
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise MocoError(f"{path} is a safetensors file; pip install safetensors to read it") from None
        return load_file(str(path))
    from moco.io import read_torch_file

    state = read_torch_file(path, what="weights")
    if not isinstance(state, dict):
        raise MocoError(f"weights {path} hold a {type(state).__name__}, not a state_dict")
    return state


# ----------------------------------------------------------------------------------------- Tracker

class Tracker:
    """One MLflow run, a context manager: ``FINISHED`` on a clean exit, ``FAILED`` with an ``error`` tag when
    the block raises (``KILLED`` on Ctrl-C).

    ``experiment`` is created when missing; ``tracking_uri`` as :func:`resolve_tracking_uri`;
    ``parent_run_id`` nests the run under another (MLflow's ``mlflow.parentRunId`` tag). The run exists
    from construction (``run_id``, ``experiment_id``, ``tracking_uri``); use it in a ``with`` block or call
    :meth:`finish`.
    """

    def __init__(self, experiment: str = "moco", *, tracking_uri: str | None = None, run_name: str | None = None,
                 tags: Mapping | None = None, parent_run_id: str | None = None, _client_for=None):
        self.tracking_uri = _client_for.tracking_uri if _client_for is not None else resolve_tracking_uri(tracking_uri)
        self.client = _client_for.client if _client_for is not None else _client(self.tracking_uri)
        self.experiment = experiment
        self.experiment_id = (_client_for.experiment_id if _client_for is not None and experiment == _client_for.experiment
                              else _experiment_id(self.client, experiment, self.tracking_uri))
        all_tags = _default_tags()
        all_tags.update({_key(k): str(v)[:_MAX_TAG] for k, v in (tags or {}).items()})
        if parent_run_id is not None:
            all_tags["mlflow.parentRunId"] = str(parent_run_id)
        try:
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
        except Exception as exc:  # noqa: BLE001
            raise MocoError(f"cannot create an MLflow run at {self.tracking_uri}: {_one_line(exc)}") from None
        self.run_id: str = run.info.run_id
        self.run_name: str = run.info.run_name
        self.parent_run_id = parent_run_id
        self._params: dict[str, str] = {}
        self._epoch_step = 0
        self._status: str | None = None

    def __repr__(self) -> str:
        return f"Tracker(run_id={self.run_id!r}, experiment={self.experiment!r}, tracking_uri={self.tracking_uri!r})"

    # -- life cycle
    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.finish()
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish("KILLED", error="interrupted")
        else:
            self.finish("FAILED", error=f"{exc_type.__name__}: {exc}")
        return False

    def child(self, run_name: str | None = None, *, tags: Mapping | None = None) -> "Tracker":
        """A run nested under this one, in the same experiment and store (same client: no second migration)."""
        return Tracker(self.experiment, run_name=run_name, tags=tags, parent_run_id=self.run_id, _client_for=self)

    def finish(self, status: str = "FINISHED", *, error: str | None = None) -> None:
        """End the run with ``status`` (``FINISHED``, ``FAILED``, ``KILLED``); ``error`` becomes the ``error``
        tag. A second call does nothing. When ending a failed run fails too (a server gone), a warning goes to
        stderr and the original error is what the caller sees."""
        if self._status is not None:
            return
        self._status = status
        try:
            if error is not None:
                self.set_tags({"error": " ".join(str(error).split())})
            with contextlib.redirect_stdout(sys.stderr):  # MLflow prints "View run at" for server stores
                self.client.set_terminated(self.run_id, status=status)
        except Exception as exc:  # noqa: BLE001
            if status == "FINISHED":
                raise MocoError(f"cannot end MLflow run {self.run_id} at {self.tracking_uri}: {_one_line(exc)}") from None
            print(f"moco: warning: could not mark MLflow run {self.run_id} {status}: {_one_line(exc)}", file=sys.stderr)

    # -- values
    def _call(self, what: str, fn: Callable, *args, **kwargs) -> Any:
        """An MLflow client call; its failure (a server gone, a full disk) as one MocoError line."""
        try:
            return fn(*args, **kwargs)
        except MocoError:
            raise
        except Exception as exc:  # noqa: BLE001 - MlflowException, requests' and SQLAlchemy's errors, OSError
            raise MocoError(f"MLflow could not {what} for run {self.run_id} at {self.tracking_uri}: "
                            f"{_one_line(exc)}") from None

    def _batch(self, *, metrics=(), params=(), tags=()) -> None:
        metrics, params, tags = list(metrics), list(params), list(tags)
        while metrics or params or tags:
            m, metrics = metrics[:_MAX_METRICS_PER_BATCH], metrics[_MAX_METRICS_PER_BATCH:]
            p, params = params[:_MAX_PARAMS_TAGS_PER_BATCH], params[_MAX_PARAMS_TAGS_PER_BATCH:]
            t, tags = tags[:_MAX_PARAMS_TAGS_PER_BATCH], tags[_MAX_PARAMS_TAGS_PER_BATCH:]
            self._call("log values", self.client.log_batch, self.run_id, metrics=m, params=p, tags=t)

    def log_params(self, params: Mapping) -> None:
        """Log ``params`` (nested dicts flattened to ``a.b``; lists of plain values kept whole) as strings,
        values over 6000 characters cut. A key logged before with the same value is skipped; with another
        value it is a MocoError (MLflow params are immutable: log the new value under another key)."""
        from mlflow.entities import Param

        if not isinstance(params, Mapping):
            raise TypeError(f"params must be a mapping, got {type(params).__name__}")
        new = []
        for key, value in flatten(params, lists="keep").items():
            key, text = _key(key), _param_text(value)
            if key in self._params:
                if self._params[key] != text:
                    raise MocoError(f"param {key!r} was logged as {self._params[key]!r} in run {self.run_id}; "
                                    f"MLflow params cannot change (got {text!r}); log it under another key")
                continue
            self._params[key] = text
            new.append(Param(key, text))
        self._batch(params=new)

    def log_metrics(self, metrics: Mapping, step: int | None = None) -> None:
        """Log the numeric values of ``metrics`` (nested dicts and short lists flattened to ``a.b`` / ``a.0``)
        at ``step`` (default 0); non-numeric and non-finite values are skipped, bools count as 0/1."""
        from mlflow.entities import Metric

        if not isinstance(metrics, Mapping):
            raise TypeError(f"metrics must be a mapping, got {type(metrics).__name__}")
        now = int(time.time() * 1000)
        rows = []
        for key, value in flatten(metrics, lists="index").items():
            v = _scalar(value)
            if v is not None:
                rows.append(Metric(_key(key), v, now, int(step or 0)))
        self._batch(metrics=rows)

    def log_epoch(self, log: Any, *, prefix: str = "") -> None:
        """One finished epoch (``EpochLog``, ``ExitEpochLog`` or a dict with ``epoch``) as metrics at
        ``step=epoch``: ``loss``, ``train_accuracy``, ``val_accuracy``, ``epoch_seconds`` (the log's
        ``seconds``), per-exit values as ``.0``, ``.1``... and ``epoch`` itself, each name after ``prefix``.
        When a workflow trains several times (a retrain per pruning step), epochs that restart at 1
        continue the step count, so no step is logged twice."""
        d = _epoch_dict(log)
        epoch = d.pop("epoch", None)
        epoch = int(epoch) if _scalar(epoch) is not None else None
        step = epoch if epoch is not None and epoch > self._epoch_step else self._epoch_step + 1
        self._epoch_step = step
        if "seconds" in d:
            d["epoch_seconds"] = d.pop("seconds")
        d["epoch"] = epoch if epoch is not None else step
        self.log_metrics({f"{prefix}{k}": v for k, v in d.items()}, step=step)

    def epoch_callback(self, *, prefix: str = "") -> Callable[[Any], None]:
        """``callback(log)`` that logs each epoch (for ``fit(on_epoch=...)`` or :func:`observe_epochs`)."""
        return lambda log: self.log_epoch(log, prefix=prefix)

    def set_tags(self, tags: Mapping) -> None:
        """Set run tags (values as strings, at most 8000 characters)."""
        from mlflow.entities import RunTag

        if not isinstance(tags, Mapping):
            raise TypeError(f"tags must be a mapping, got {type(tags).__name__}")
        self._batch(tags=[RunTag(_key(k), (v if isinstance(v, str) else _param_text(v))[:_MAX_TAG])
                          for k, v in tags.items()])

    # -- artifacts
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file, or a folder's whole content, into the run's artifacts (under ``artifact_path``; a
        folder goes under its own name when ``artifact_path`` is None)."""
        path = Path(path)
        if path.is_dir():
            self._call(f"store {path}", self.client.log_artifacts, self.run_id, str(path), artifact_path or path.name)
        elif path.is_file():
            self._call(f"store {path}", self.client.log_artifact, self.run_id, str(path), artifact_path)
        else:
            raise MocoError(f"artifact {path} does not exist; give an existing file or folder")

    def log_dict(self, obj: Any, name: str) -> None:
        """``obj`` (made JSON-safe) as the JSON artifact ``name`` (``.json`` added when missing)."""
        from moco.results import json_safe

        name = name if name.endswith(".json") else name + ".json"
        self.log_text(json.dumps(json_safe(obj), indent=2, sort_keys=True) + "\n", name)

    def log_text(self, text: str, name: str) -> None:
        """``text`` as the artifact file ``name`` (a relative path such as ``tables/steps.txt``)."""
        self._call(f"store {name}", self.client.log_text, self.run_id, str(text), name)

    def log_figure(self, fig, name: str) -> None:
        """A matplotlib figure as the PNG artifact ``name`` (``.png`` added when missing)."""
        if not hasattr(fig, "savefig"):
            raise TypeError(f"fig must be a matplotlib Figure, got {type(fig).__name__}")
        name = name if name.lower().endswith(".png") else name + ".png"
        self._call(f"store {name}", self.client.log_figure, self.run_id, fig, name)

    def log_model(self, model, *, arch: Mapping | None = None, name: str = "model") -> None:
        """The model's weights and architecture as artifacts ``name/state_dict.{safetensors,pt}`` +
        ``name/arch.json`` (see :func:`save_model_files`; read back with :func:`load_state_dict`).
        ``arch`` tells how to build the model, e.g. ``{"spec": "mynet.py:Net", "args": {"width": 16}}`` or a
        zoo spec ``{"name": "resnet18", "kwargs": {...}}``."""
        with tempfile.TemporaryDirectory(prefix="moco-track-") as tmp:
            folder = save_model_files(model, Path(tmp) / "model", arch=arch)
            self._call(f"store the model as {name}/", self.client.log_artifacts, self.run_id, str(folder), name)


def log_environment(tracker: Tracker) -> None:
    """Versions (python, torch, moco, onnxruntime, numpy, mlflow, lightning, optuna when installed), torch
    threads, logical cores and the platform as tags of ``tracker``'s run."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    import moco

    tags = {"moco.version": moco.__version__, "python.version": platform.python_version(),
            "torch.version": str(torch.__version__), "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(), "cpu_count": os.cpu_count() or 1,
            "platform": platform.platform()}
    for dist in ("onnxruntime", "numpy", "mlflow", "lightning", "optuna"):
        try:
            tags[f"{dist}.version"] = version(dist)
        except PackageNotFoundError:
            tags[f"{dist}.version"] = "not installed"
    tracker.set_tags(tags)


# ---------------------------------------------------------------------------------- moco run, bench

class RunTracking:
    """What ``moco run CONFIG --track`` logs: one parent run for the pipeline and a nested run per step.

    Parent: params = the config flattened (``model.spec``, ``steps.0.method``, ...), tags = config name,
    seed, versions, threads; metrics = the original's and each step's ``test_accuracy``, ``agreement``,
    ``macs`` (per sample), ``param_count``, ``ratio_vs_eager``, ``ratio_vs_onnxruntime`` (time ratios, below
    1 faster) at ``step`` = step number (0: the original; the latest value is the final one) and the summary (``accuracy_base``, ``accuracy_final``,
    ``macs_base``, ``macs_final``, ``macs_reduction``, ``certified.N.bound``); artifacts = ``report.md``,
    ``report.json``, ``config.json`` and the final model (``model/``: state_dict + ``arch.json``).
    Step run ``NN-method``: params = the step's effective parameters, metrics = its measurement, its
    summary's numbers (``summary.*``), its certified bound (``certified.*``) and, where it trains, the
    per-epoch metrics; artifacts = the step folder.
    """

    def __init__(self, cfg, out: Path, *, tracking_uri: str | None = None, experiment: str | None = None):
        source = Path(str(cfg.source)).stem if cfg.source else "run"
        self.out = Path(out)
        self.tracker = Tracker(experiment or "moco", tracking_uri=tracking_uri, run_name=source,
                               tags={"moco.kind": "run", "config": source, "seed": cfg.seed, "out": str(out)})
        self.step_runs: list[Tracker] = []
        self._step: Tracker | None = None
        self._observing: contextlib.ExitStack | None = None

    def started(self, config: Mapping, env: Mapping) -> None:
        """Params and tags of the pipeline, once the config is resolved."""
        t = self.tracker
        log_environment(t)
        t.set_tags({"config_digest": env.get("config_digest", ""), "threads": env.get("threads", "")})
        t.log_params(config)

    def measured(self, index: int, m: Mapping) -> None:
        """The original's (``index`` 0) or a step's measurement as the parent's per-step series."""
        self.tracker.log_metrics(_measurement(m), step=index)

    def step_started(self, index: int, step) -> Tracker:
        """Open the nested run of step ``index`` (params: its effective parameters); until
        :meth:`step_done`, epochs that training code reports (:func:`notify_epoch`) are logged to it."""
        from moco.run.steps import STEP_PARAMS

        self._close_step("FAILED", "a new step started before this one was done")
        child = self.tracker.child(f"{index:02d}-{step.method}",
                                   tags={"moco.kind": "run-step", "method": step.method, "step": index})
        self._step = child
        self.step_runs.append(child)
        child.log_params({**STEP_PARAMS.get(step.method, {}), **dict(step.params), "method": step.method})
        self._observing = contextlib.ExitStack()
        self._observing.enter_context(observe_epochs(child.epoch_callback()))
        return child

    def step_done(self, rec) -> None:
        """A finished step's record into its run, which ends; its measurement into the parent's series."""
        child = self._step
        if child is None:
            raise MocoError("RunTracking.step_done without step_started")
        d = rec.to_dict()
        metrics = {**_measurement(d), "seconds": d.get("seconds"), "exit_fraction": d.get("exit_fractions"),
                   "summary": d.get("summary"), "certified": d.get("certified")}
        child.log_metrics(metrics)
        child.set_tags({"changed": rec.changed})
        if rec.text:
            child.log_text(rec.text.rstrip() + "\n", "step.txt")
        folder = Path(rec.folder)
        if folder.is_dir():
            child.log_artifact(folder, folder.name)
        self._close_step("FINISHED")
        self.measured(rec.index, d)

    def _close_step(self, status: str, error: str | None = None) -> None:
        if self._observing is not None:
            self._observing.close()
            self._observing = None
        if self._step is not None:
            self._step.finish(status, error=error)
            self._step = None

    def finished(self, result, stage, arch: Mapping | None = None) -> None:
        """The summary metrics, the report files and the final model into the parent run, which ends."""
        import torch

        t = self.tracker
        s = result.summary()
        last = len(result.steps)
        t.log_metrics({k: s.get(k) for k in ("accuracy_base", "accuracy_final", "macs_base", "macs_final",
                                            "macs_reduction")}, step=last)
        t.log_metrics({"certified": s.get("certified") or []}, step=last)
        t.set_tags({"steps": ",".join(s.get("steps") or []) or "none"})
        for name in ("report.md", "report.json", "config.json"):
            if (self.out / name).is_file():
                t.log_artifact(self.out / name)
        model = stage.obj if isinstance(stage.obj, torch.nn.Module) else stage.model
        if model is not None:
            t.log_model(model, arch={**(arch or {}), "stage": stage.kind, "class": type(stage.obj).__name__})
        t.finish()

    def failed(self, exc: BaseException) -> None:
        """End the open step run and the pipeline run: ``KILLED`` on Ctrl-C, else ``FAILED`` with the error."""
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        error = "interrupted" if status == "KILLED" else f"{type(exc).__name__}: {exc}"
        self._close_step(status, error)
        self.tracker.finish(status, error=error)

    def summary_line(self) -> str:
        """One line saying where the runs went (for the person at the terminal)."""
        t = self.tracker
        return (f"tracked: MLflow run {t.run_id} with {len(self.step_runs)} step run(s), experiment "
                f"{t.experiment!r} at {t.tracking_uri}")


def _measurement(m: Mapping) -> dict[str, Any]:
    """A run measurement under the metric names every moco run uses (``test_accuracy``, ``param_count``)."""
    return {"test_accuracy": m.get("accuracy"), "agreement": m.get("agreement"), "macs": m.get("macs"),
            "param_count": m.get("params"), "ratio_vs_eager": m.get("ratio_vs_eager"),
            "ratio_vs_onnxruntime": m.get("ratio_vs_onnxruntime")}


def track_benchmark(name: str, *, quick: bool, seed: int, tracking_uri: str | None = None,
                    experiment: str | None = None) -> Tracker:
    """The run of ``moco bench NAME --track`` (experiment ``moco-bench`` unless named); params = the settings
    (benchmark, quick, seed), tags = versions and threads. Log the result with :func:`log_benchmark_result`."""
    t = Tracker(experiment or "moco-bench", tracking_uri=tracking_uri, run_name=name,
                tags={"moco.kind": "bench", "benchmark": name})
    log_environment(t)
    t.log_params({"benchmark": name, "quick": bool(quick), "seed": int(seed)})
    return t


def log_benchmark_result(t: Tracker, result: Mapping, table: str) -> None:
    """A benchmark's JSON: numeric leaves as metrics (flattened keys, ``meta.wall_s`` included), its ``config``
    / ``settings`` entries as params, the JSON and the printed table as artifacts."""
    settings = {k: result[k] for k in ("config", "settings") if isinstance(result.get(k), Mapping)}
    if settings:
        t.log_params(settings)
    t.log_metrics({k: v for k, v in result.items()})
    t.log_dict(result, "result.json")
    t.log_text(table if table.endswith("\n") else table + "\n", "table.txt")

