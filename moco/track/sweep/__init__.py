"""Sweeps on Optuna (seed 003's workflow as one command): ``moco sweep CONFIG.toml``.

::

    from moco.track.sweep import load_sweep, run_sweep

    cfg = load_sweep("examples/sweeps/fashion_arch.toml", quick=True)
    result = run_sweep(cfg, out="moco-out/sweeps/arch", workers=2)    # 2 processes share one study
    print(result)                # trials sorted by the first objective, the best as Params1(...)
    result.summary()             # the JSON line of 'moco sweep'

* :mod:`~moco.track.sweep.config`: the sweep file (training or pipeline sweeps), validated before any work;
* :mod:`~moco.track.sweep.storage`: the Optuna storage (journal file, SQLite, PostgreSQL), the study lock,
  interrupted trials, grid queueing;
* :mod:`~moco.track.sweep.objective`: one trial (train or compress, measure, artifacts, MLflow);
* :mod:`~moco.track.sweep.runner`: worker processes, resume, progress, the result.

Output folder (the contract with ``moco report``): ``OUT/sweep.toml`` (the effective file), ``OUT/sweep.json``,
``OUT/study.journal`` (unless ``--storage``), ``OUT/trials/NNNN/`` per trial (``config.toml``, ``state_dict.pt``
+ ``arch.json``, ``history.json``, ``predictions.npz``), ``OUT/result.json``.
"""

from moco.track.sweep.config import SweepConfig, dumps_toml, load_sweep, sweep_from_dict
from moco.track.sweep.runner import SweepResult, run_sweep
from moco.track.sweep.storage import parse_storage

__all__ = ["SweepConfig", "SweepResult", "dumps_toml", "load_sweep", "parse_storage", "run_sweep", "sweep_from_dict"]
