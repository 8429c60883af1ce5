"""Rule-based early exit (seed 000): sufficient linear rules on a layer's activations, certified on
held-out data, and ``BranchedNetwork`` which lets the samples a rule covers skip the rest of the model."""

from moco.rules.engine import AnalyticsEngine
from moco.rules.rule import LinearRule, RuleSet, load_rule, load_rules
from moco.rules.scorer import LinearScorer, fit_linear_scorer
from moco.rules.threshold import ThresholdChoice, select_threshold

__all__ = [
    "AnalyticsEngine", "LinearRule", "RuleSet", "load_rule", "load_rules", "LinearScorer", "fit_linear_scorer",
    "ThresholdChoice", "select_threshold",
]
