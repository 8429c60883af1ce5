"""Learned early exits (BranchyNet) with calibrated thresholds and real batched speed-ups.

Workflow: :func:`attach_exits` (heads after named points of any model, sharing its parameters) ->
:func:`train_exits` (joint, or retrofit on a frozen backbone) -> :func:`calibrate` (thresholds with a
certified accuracy-drop or agreement bound, maximising MACs saved) -> ``net(x)`` returns
``(logits, exit_index)`` and really skips the work of samples that left -> :func:`evaluate_exits`,
:func:`tradeoff_curve` for reports -> :func:`save_exits` / :func:`load_exits`.
"""

from moco.exits.calibrate import CalibrationResult, FamilyPoint, calibrate
from moco.exits.criteria import CRITERIA, Criterion, Entropy, MaxProb, get_criterion
from moco.exits.heads import (ConvPoolLinearHead, HeadFactory, PoolLinearHead, SepConvPoolLinearHead, conv_pool_linear,
                              pool_linear, sep_conv_pool_linear)
from moco.exits.io import load_exits, save_exits
from moco.exits.network import EarlyExitNetwork, ExitCosts, attach_exits, auto_points
from moco.exits.outputs import ExitOutputs, collect_outputs, simulate
from moco.exits.report import (ExitReport, TradeoffCurve, TradeoffPoint, evaluate_exits, summarize_outputs,
                               tradeoff_curve)
from moco.exits.training import ExitEpochLog, ExitTrainResult, default_weights, exit_accuracies, train_exits

__all__ = [
    "CRITERIA", "CalibrationResult", "ConvPoolLinearHead", "Criterion", "EarlyExitNetwork", "Entropy",
    "ExitCosts", "ExitEpochLog", "ExitOutputs", "ExitReport", "ExitTrainResult", "FamilyPoint", "HeadFactory",
    "MaxProb", "PoolLinearHead", "SepConvPoolLinearHead", "TradeoffCurve", "TradeoffPoint", "attach_exits", "auto_points", "calibrate",
    "collect_outputs", "conv_pool_linear", "default_weights", "evaluate_exits", "exit_accuracies",
    "get_criterion", "load_exits", "pool_linear", "save_exits", "sep_conv_pool_linear", "simulate", "summarize_outputs", "tradeoff_curve",
    "train_exits",
]
