"""Structured compression (seeds 001 and 003): analyse, choose units, rebuild a smaller dense model, fine-tune, measure.

* :mod:`moco.compress.pfa` -- Principal Filter Analysis: streaming covariance of pooled responses, recipes
  (Energy, KL, Size) and unit selection (AbsMax, AbsMin, L1Max, L1Min);
* :mod:`moco.compress.prune` -- L1-norm filter importance, one-shot and iterative pruning with retraining;
* :mod:`moco.compress.surgery` -- ``apply(model, keep, example_input)``: a new, physically smaller model
  with every dependent layer adjusted, saved as JSON + weights;
* :mod:`moco.compress.finetune`, :mod:`moco.compress.report` -- fine-tuning after surgery and the
  before/after report measured side by side.
"""

__all__ = []
