"""``moco run CONFIG.toml``: a user's model and data through a chain of steps, measured, one report.

::

    from moco.run import load_config, run_config
    result = run_config(load_config("examples/prune.toml"), "moco-out/prune")
    print(result.to_text())            # one row per step: params, MACs, accuracy, agreement, time ratios
    result.summary()                   # the JSON line of `moco run`

Steps and their parameters: :data:`moco.run.steps.STEP_PARAMS`; the config schema:
:mod:`moco.run.config`; what is measured: :mod:`moco.run.runner`.
"""

from moco.run.config import RunConfig, StepConfig, config_from_dict, load_config, parse_set_options
from moco.run.runner import RunResult, StepRecord, build_context, run_config
from moco.run.stage import RunContext, Stage
from moco.run.steps import STEP_METHODS, STEP_PARAMS, StepOutcome

__all__ = ["RunConfig", "RunContext", "RunResult", "STEP_METHODS", "STEP_PARAMS", "Stage", "StepConfig",
           "StepOutcome", "StepRecord", "build_context", "config_from_dict", "load_config", "parse_set_options",
           "run_config"]
