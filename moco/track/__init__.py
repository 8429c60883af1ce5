"""Experiments on moco: MLflow tracking of every workflow (``--track``), Optuna sweeps and their reports.

::

    from moco.track import Tracker, log_environment, resolve_tracking_uri

    with Tracker("my-experiment", run_name="baseline") as t:      # MLflow run in sqlite:///mlflow.db here
        log_environment(t)
        t.log_params({"lr": 1e-3, "model": {"spec": "mynet.py:Net"}})
        t.log_metrics({"test_accuracy": 0.91})

``moco run CONFIG --track`` and ``moco bench NAME --track`` log through the same :class:`Tracker`
(:mod:`moco.track.tracking` says what goes where). Names are loaded on first use: ``import moco.track``
imports neither MLflow nor Optuna nor Lightning.
"""

from importlib import import_module

_LAZY = {name: "moco.track.tracking" for name in (
    "DEFAULT_TRACKING_URI", "MODEL_FORMAT", "RunTracking", "Tracker", "flatten", "load_state_dict",
    "log_benchmark_result", "log_environment", "notify_epoch", "observe_epochs", "resolve_tracking_uri",
    "save_model_files", "track_benchmark")}

__all__ = sorted(_LAZY)


def __dir__() -> list[str]:
    """The module's names plus the lazily loaded ones."""
    return sorted(set(globals()) | set(_LAZY))


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moco.track' has no attribute {name!r}")
