"""``RuleReport``: what ``compute_linear_sufficient_rule(s)`` returns beside the rule, as a result object.

It is a dict (``out["coverage_val"]`` keeps working, as in seed 000's notebook) with the
result protocol: ``to_text()`` (also ``str()``), ``to_dict()`` (JSON-safe) and ``to_frame()`` (one row
per class for a rule set). A rule that certifies nothing warns (:class:`UncertifiedRuleWarning`)
naming the layer, the coverage and what to try.
"""

from __future__ import annotations

import warnings
from typing import Any

from moco.results import ResultProtocol, frame_text, json_safe

__all__ = ["RuleReport", "UncertifiedRuleWarning", "warn_if_uncertified"]


class UncertifiedRuleWarning(UserWarning):
    """A rule (set) that certifies nothing: no held-out sample would exit, so it only adds its cost."""


class RuleReport(ResultProtocol, dict):
    """Coverage and precision of a rule or rule set on the fit and held-out splits, the certified
    precision and timings (keys as documented on :meth:`AnalyticsEngine.compute_linear_sufficient_rule`).

    A ``dict`` (so ``out["coverage_val"]``, ``json.dumps(out)`` and pickling ``rule.metadata`` work as in
    seed 000) with the result protocol on top."""

    @property
    def _values(self) -> dict[str, Any]:
        return self

    def __repr__(self) -> str:
        return f"RuleReport({dict.__repr__(self)})"

    @property
    def certified(self) -> bool:
        return bool(self._values.get("certified"))

    def to_dict(self) -> dict[str, Any]:
        return json_safe(self._values)

    def to_frame(self):
        import pandas as pd

        per_class = self._values.get("per_class")
        if per_class:
            return pd.DataFrame([{"class": int(c), **v} for c, v in per_class.items()])
        keys = ("class", "threshold", "coverage_fit", "precision_fit", "coverage_val", "precision_val",
                "certified_precision", "certified")
        return pd.DataFrame([{k: self._values.get(k) for k in keys}])

    def to_text(self) -> str:
        v = self._values
        what = (f"rule for class {v['class']}" if "class" in v else
                f"rule set for classes {v.get('classes')}")
        cert = v.get("certified_precision")
        lines = [
            f"{what} ({v.get('kind')}, max_error {v.get('max_error')}, confidence {v.get('confidence')}): "
            + (f"certified precision {cert:.4f}" if cert is not None else "NOT certified (no held-out sample fires)"),
            f"coverage fit {_pct(v.get('coverage_fit'))} (precision {_pct(v.get('precision_fit'))}), "
            f"held-out {_pct(v.get('coverage_val'))} (precision {_pct(v.get('precision_val'))}) "
            f"on {v.get('n_fit')} + {v.get('n_val')} samples; fitted in {v.get('fit_seconds', 0.0):.2f} s",
        ]
        if v.get("per_class"):
            lines += ["", frame_text(self.to_frame())]
        return "\n".join(lines)


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def warn_if_uncertified(report: RuleReport, layer: Any, samples: int) -> None:
    """Warn, naming the layer, the coverage and what to try, when ``report`` certifies nothing."""
    if report.certified and report.get("coverage_val"):
        return
    warnings.warn(
        f"rules at layer {layer!r} certified nothing: held-out coverage {_pct(report.get('coverage_val'))} at "
        f"max_error {report.get('max_error')}; a BranchedNetwork with them exits 0% of samples. Try a later "
        f"layer, a looser max_error, or more samples (now {samples})",
        UncertifiedRuleWarning, stacklevel=3)
