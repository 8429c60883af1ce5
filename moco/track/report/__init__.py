"""Reports of sweeps and experiments (seed 003): ``moco report SOURCE``.

A sweep folder, an Optuna storage + study or an MLflow experiment becomes one :class:`SweepReport`: the
trials as a table sorted by the objective, Pareto fronts of test accuracy against MACs and against
training time, per-parameter effect plots, per-run curves and the Facets-style error grid, the best
configuration in the seed's ``Params1(...)``/``Params2(...)`` style and as a config file, and one static
HTML page with the images embedded::

    from moco.track.report import build_report
    report = build_report("moco-out/sweeps/fashion-arch")      # or storage=..., study=... / experiment=...
    print(report)                                              # the table, fronts and best configuration
    report.write_html("report/")                               # report.html + PNGs + best_config.toml
"""

from .config import fixed_sweep_config, params_text, toml_dumps
from .core import REPORT_FORMAT, RunView, SweepReport, build_report
from .plots import pareto_mask
from .sources import Trial, TrialDetail, TrialSource, load_predictions, open_source

__all__ = ["REPORT_FORMAT", "RunView", "SweepReport", "Trial", "TrialDetail", "TrialSource", "build_report",
           "fixed_sweep_config", "load_predictions", "open_source", "params_text", "pareto_mask", "toml_dumps"]
