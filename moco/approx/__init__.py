"""Approximate computing (seed 002): int8 QAT, noise-tolerance search, approximate multipliers, retraining.

The workflow, on any model with Conv2d/Linear layers::

    from moco.approx import (train_quant, train_gradient, select_multipliers, deploy_multipliers,
                             train_approx, library, run_approx)
    q = train_quant(model, (x, y))                      # copy, 8-bit fake quantisation, 1 QAT epoch
    search = train_gradient(q, (x, y), lmbd=0.2)        # learn sigma_l per layer (in place)
    res = select_multipliers(q, x[:512], library())     # cheapest multiplier each layer tolerates
    approx = deploy_multipliers(q, res, library())      # copy with bit-exact LUT layers
    train_approx(approx, (x, y), epochs=2)              # approximate retraining

Modules: :mod:`~moco.approx.quant` (8-bit QAT and the integer view), :mod:`~moco.approx.multipliers`
(the multiplier library, error metrics, energy model), :mod:`~moco.approx.lut` (bit-exact LUT
layers), :mod:`~moco.approx.agn` (noise search), :mod:`~moco.approx.select` (selection, deployment),
:mod:`~moco.approx.workflow` (the stages and :func:`run_approx`).
"""

from moco.approx.agn import GradientSearchResult, train_gradient
from moco.approx.lut import LUTConv2d, LUTLinear, to_lut
from moco.approx.multipliers import ApproximateMultiplier, library
from moco.approx.quant import QuantConv2d, QuantLinear, calibrate, quant_layers, quantize
from moco.approx.select import SelectionResult, deploy_multipliers, select_multipliers, uniform_assignment
from moco.approx.workflow import ApproxResult, run_approx, train_approx, train_baseline, train_quant

__all__ = [
    "ApproximateMultiplier",
    "library",
    "quantize",
    "calibrate",
    "quant_layers",
    "QuantConv2d",
    "QuantLinear",
    "LUTConv2d",
    "LUTLinear",
    "to_lut",
    "train_baseline",
    "train_quant",
    "train_gradient",
    "GradientSearchResult",
    "select_multipliers",
    "SelectionResult",
    "deploy_multipliers",
    "uniform_assignment",
    "train_approx",
    "run_approx",
    "ApproxResult",
]
