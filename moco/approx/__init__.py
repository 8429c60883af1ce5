"""Approximate computing (seed 002): int8 QAT, noise-tolerance search, approximate multipliers, retraining.

Modules: :mod:`~moco.approx.quant` (8-bit QAT and the integer view), :mod:`~moco.approx.multipliers`
(the multiplier library, error metrics, energy model), :mod:`~moco.approx.lut` (bit-exact LUT-simulated
layers).
"""

from moco.approx.lut import LUTConv2d, LUTLinear, to_lut
from moco.approx.multipliers import ApproximateMultiplier, library
from moco.approx.quant import QuantConv2d, QuantLinear, calibrate, quant_layers, quantize

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
]
