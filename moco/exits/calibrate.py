"""``calibrate(net, data, target=...)``: per-exit thresholds with a certified risk, maximising MACs saved.

Both targets are made binary so an exact binomial bound certifies them:

* ``metric="accuracy_drop"``: a sample's bad event is "it left early with a wrong class while the
  final exit is right". Its rate is an upper bound on the accuracy drop of the early-exit network
  against the same network with exits disabled (samples that leave early with the right class where
  the final exit is wrong only improve accuracy).
* ``metric="disagreement"``: the bad event is "it left early with another class than the final exit";
  ``1 - rate`` is the agreement with the full network (no labels needed).

Method (Learn-then-Test with fixed-sequence testing): the calibration samples are shuffled (``seed``)
and split. The first ``fit_fraction`` builds a 1-D family of threshold vectors, ordered from
conservative to aggressive: for a level ``lam`` each exit ``i`` gets the most aggressive threshold
whose bad-event rate among the fitting samples passing it is at most ``lam * s_i / s_0`` (``s_i`` the
MACs a sample saves by leaving at exit ``i``, so exits that save more may take proportionally more
risk), and exits that do not pay for their head on the fitting samples are disabled. The family
starts with "no exit". The rest of the samples tests the family in order: hypothesis ``j`` is
certified when the Clopper-Pearson upper bound (``confidence``) of its bad-event count is at most
``target``; testing stops at the first failure. With probability at least ``confidence`` every
certified vector has a true risk <= ``target``, so the one with the fewest expected MACs among them is
chosen. Exits are simulated from one pass of every exit over the data (:mod:`moco.exits.outputs`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from moco.errors import MocoError
from moco.exits.network import EarlyExitNetwork
from moco.exits.outputs import METRICS, ExitOutputs, collect_outputs, risk_events, simulate
from moco.stats import clopper_pearson_upper, min_samples_for

__all__ = ["CalibrationResult", "FamilyPoint", "calibrate"]


@dataclass(frozen=True)
class FamilyPoint:
    """One threshold vector of the tested family: level ``lam``, ``thresholds``, on the test part its
    bad-event ``risk`` (fraction), certified ``bound``, expected ``macs`` per sample, and ``certified``."""

    lam: float
    thresholds: tuple[float | None, ...]
    risk: float
    bound: float
    macs: float
    certified: bool


@dataclass(frozen=True)
class CalibrationResult:
    """What :func:`calibrate` chose and what it certifies (rates are fractions; MACs per sample).

    ``thresholds``: the chosen vector (also set on the network); ``metric``, ``target``,
    ``confidence``: the promise, "risk <= target with probability >= confidence";
    ``certified_bound``: the Clopper-Pearson upper bound on the risk of the chosen vector;
    ``measured_risk``: its bad-event rate on the test part (``n_test`` samples, ``n_fit`` built the
    family); ``accuracy_drop``: measured accuracy of the final exit minus that of the early-exit
    network on the test part (None without labels); ``agreement``: fraction of test-part samples
    whose early-exit prediction equals the final exit's; ``exit_fractions``: share of test-part
    samples per exit; ``expected_macs`` / ``full_macs``: MACs per sample with and without exits;
    ``macs_reduction = full_macs / expected_macs``; ``family``: every tested vector.
    """

    thresholds: tuple[float | None, ...]
    metric: str
    target: float
    confidence: float
    certified_bound: float
    measured_risk: float
    accuracy_drop: float | None
    agreement: float
    exit_fractions: tuple[float, ...]
    expected_macs: float
    full_macs: float
    n_fit: int
    n_test: int
    family: tuple[FamilyPoint, ...]

    @property
    def macs_reduction(self) -> float:
        return self.full_macs / self.expected_macs if self.expected_macs > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (the family as lists)."""
        return {
            "thresholds": list(self.thresholds), "metric": self.metric, "target": self.target,
            "confidence": self.confidence, "certified_bound": self.certified_bound,
            "measured_risk": self.measured_risk, "accuracy_drop": self.accuracy_drop, "agreement": self.agreement,
            "exit_fractions": list(self.exit_fractions), "expected_macs": self.expected_macs,
            "full_macs": self.full_macs, "macs_reduction": self.macs_reduction, "n_fit": self.n_fit,
            "n_test": self.n_test, "family_size": len(self.family),
            "family_certified": sum(p.certified for p in self.family),
        }

    def to_text(self) -> str:
        """A short readable summary."""
        thr = ", ".join("off" if t is None else f"{t:.4g}" for t in self.thresholds)
        drop = "" if self.accuracy_drop is None else f", measured accuracy drop {self.accuracy_drop * 100:.2f} points"
        return "\n".join([
            f"calibrated {self.metric} <= {self.target:.4g} at {self.confidence:.0%} confidence "
            f"({self.n_fit} samples built the family of {len(self.family)}, {self.n_test} tested it)",
            f"thresholds [{thr}]; certified bound {self.certified_bound:.4f}, measured risk {self.measured_risk:.4f}"
            f"{drop}, agreement with the final exit {self.agreement:.4f}",
            f"exit fractions [{', '.join(f'{f:.3f}' for f in self.exit_fractions)}]; expected "
            f"{self.expected_macs / 1e6:.3f} M MACs per sample vs {self.full_macs / 1e6:.3f} M "
            f"({self.macs_reduction:.2f}x fewer)",
        ])

    def to_frame(self):
        """One row per tested threshold vector of the family: level, thresholds, risk, bound, MACs."""
        import pandas as pd

        return pd.DataFrame([{"lam": p.lam, "thresholds": list(p.thresholds), "risk": p.risk, "bound": p.bound,
                              "macs": p.macs, "certified": p.certified} for p in self.family])

    def __str__(self) -> str:
        return self.to_text()


def _fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    if not 0.0 < float(value) < 1.0:
        raise MocoError(f"{name} must be in (0, 1), got {value}")
    return float(value)


def _macs_of(exit_at: np.ndarray, exit_macs: Sequence[float]) -> float:
    return float(np.asarray(exit_macs)[exit_at].mean())


def _family(net: EarlyExitNetwork, fit: ExitOutputs, bad: np.ndarray, levels: np.ndarray) -> list[tuple[float, tuple]]:
    """Threshold vectors built on the fitting part, one per level (consecutive duplicates dropped)."""
    crit, costs = net.criterion, net.costs
    k = fit.num_exits
    all_on = costs.exit_macs()
    savings = np.array([all_on[-1] - all_on[i] for i in range(k - 1)])
    scale = savings / savings[0] if savings[0] > 0 else np.ones(k - 1)
    orders = []
    for i in range(k - 1):
        key = -fit.scores[i] if crit.higher_is_confident else fit.scores[i]
        order = np.argsort(key, kind="stable")
        running = np.cumsum(bad[i][order]) / np.arange(1, fit.n + 1)
        orders.append((fit.scores[i][order], running))
    out: list[tuple[float, tuple]] = []
    for lam in levels:
        thr: list[float | None] = []
        for i in range(k - 1):
            sorted_scores, running = orders[i]
            ok = np.nonzero(running <= lam * max(scale[i], 0.0))[0]
            thr.append(float(sorted_scores[ok[-1]]) if ok.size and scale[i] > 0 else None)
        # disable exits that do not pay for their head on the fitting samples
        improved = True
        while improved:
            improved = False
            base = _macs_of(simulate(fit, thr, crit), costs.exit_macs([t is not None for t in thr]))
            for i in range(k - 1):
                if thr[i] is None:
                    continue
                trial = list(thr)
                trial[i] = None
                m = _macs_of(simulate(fit, trial, crit), costs.exit_macs([t is not None for t in trial]))
                if m < base:
                    thr, base, improved = trial, m, True
        vec = tuple(thr)
        if not out or out[-1][1] != vec:
            out.append((float(lam), vec))
    return out


def calibrate(
    net: EarlyExitNetwork,
    data: Any,
    *,
    target: float = 0.005,
    metric: str = "accuracy_drop",
    confidence: float = 0.95,
    fit_fraction: float = 0.3,
    levels: int = 80,
    seed: int = 0,
    batch_size: int = 512,
    progress: bool = True,
) -> CalibrationResult:
    """Choose and set ``net.thresholds`` so that the risk stays within ``target`` with ``confidence``.

    Args:
        net: the early-exit network (trained heads); its ``thresholds`` are replaced.
        data: calibration data held out from training: ``(x, y)``, a labelled Dataset, a DataLoader,
            or :class:`~moco.exits.outputs.ExitOutputs` already collected on it. ``"disagreement"``
            also accepts unlabelled inputs.
        target: largest acceptable risk, a fraction: 0.005 is an accuracy drop of 0.5 points
            (``"accuracy_drop"``) or 99.5% agreement with the final exit (``"disagreement"``).
        metric: ``"accuracy_drop"`` or ``"disagreement"`` (see the module docstring).
        confidence: probability (over the calibration draw) that the promise holds, e.g. 0.95.
        fit_fraction: share of the samples used to build the threshold family; the rest certify.
        levels: number of risk levels in the family.
        seed: seeds the split of the calibration samples.

    Returns:
        :class:`CalibrationResult` with the certified bound next to the measured risk, the exit
        fractions and the expected MACs per sample on the held-out part.

    Raises:
        MocoError: the target cannot be certified with this many samples even with no bad event
            (the message gives the number needed), a target or confidence outside (0, 1), missing
            labels for ``"accuracy_drop"``, an unknown metric.
    """
    if not isinstance(net, EarlyExitNetwork):
        raise TypeError(f"net must be an EarlyExitNetwork (from attach_exits), not {type(net).__name__}")
    target = _fraction("target", target)
    confidence = _fraction("confidence", confidence)
    fit_fraction = _fraction("fit_fraction", fit_fraction)
    if metric not in METRICS:
        raise MocoError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise MocoError(f"levels must be an int >= 2, got {levels!r}")
    outputs = data if isinstance(data, ExitOutputs) else collect_outputs(net, data, batch_size=batch_size,
                                                                          progress=progress)
    if outputs.num_exits != net.num_exits:
        raise MocoError(f"the outputs hold {outputs.num_exits} exits but the network has {net.num_exits}")
    bad_all = risk_events(outputs, metric)
    n = outputs.n
    n_fit = int(round(n * fit_fraction))
    n_test = n - n_fit
    need = min_samples_for(target, confidence)
    if n_fit < 1 or n_test < need:
        total = math.ceil(need / (1 - fit_fraction)) + 1
        raise MocoError(
            f"cannot certify {metric} <= {target} at {confidence:.0%} confidence with {n} calibration samples: "
            f"even with no bad event it needs >= {need} test samples, and {n_test} remain after fit_fraction="
            f"{fit_fraction}; pass at least {total} samples, or raise target / lower confidence"
        )
    perm = np.random.default_rng(seed).permutation(n)
    fit_idx, test_idx = perm[:n_fit], perm[n_fit:]
    fit, test = outputs.subset(fit_idx), outputs.subset(test_idx)
    bad_fit, bad_test = bad_all[:, fit_idx], bad_all[:, test_idx]
    grid = np.concatenate([[0.0], np.geomspace(1e-4, 0.5, levels - 1)])
    candidates = [(-1.0, (None,) * (net.num_exits - 1)), *_family(net, fit, bad_fit, grid)]
    cols = np.arange(n_test)
    family: list[FamilyPoint] = []
    stopped = False
    for lam, thr in candidates:
        exit_at = simulate(test, thr, net.criterion)
        k = int(bad_test[exit_at, cols].sum())
        bound = float(clopper_pearson_upper(k, n_test, confidence))
        ok = (not stopped) and bound <= target
        stopped = stopped or not ok
        macs = _macs_of(exit_at, net.costs.exit_macs([t is not None for t in thr]))
        family.append(FamilyPoint(lam, thr, k / n_test, bound, macs, ok))
    chosen = min((p for p in family if p.certified), key=lambda p: p.macs)
    net.thresholds = list(chosen.thresholds)
    exit_at = simulate(test, chosen.thresholds, net.criterion)
    taken = test.predictions[exit_at, cols]
    final = test.predictions[-1]
    drop = None
    if test.labels is not None:
        drop = float((final == test.labels).mean() - (taken == test.labels).mean())
    fractions = tuple(float(f) for f in np.bincount(exit_at, minlength=net.num_exits) / n_test)
    return CalibrationResult(
        thresholds=chosen.thresholds, metric=metric, target=target, confidence=confidence,
        certified_bound=chosen.bound, measured_risk=chosen.risk, accuracy_drop=drop,
        agreement=float((taken == final).mean()), exit_fractions=fractions, expected_macs=chosen.macs,
        full_macs=net.costs.full_macs, n_fit=n_fit, n_test=n_test, family=tuple(family),
    )
