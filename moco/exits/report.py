"""Reports on an early-exit network: exit histogram, accuracy per exit, expected MACs per sample (from the
profiler) next to measured time, and the accuracy-vs-MACs curve over threshold values (PNG).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from moco.batches import iter_batches
from moco.errors import MocoError
from moco.exits.network import EarlyExitNetwork
from moco.exits.outputs import ExitOutputs, simulate
from moco.io import atomic_path

__all__ = ["ExitReport", "TradeoffCurve", "TradeoffPoint", "evaluate_exits", "summarize_outputs", "tradeoff_curve"]


@dataclass(frozen=True)
class ExitReport:
    """The early-exit network on ``n`` samples, measured with its real batched forward pass.

    ``exit_counts`` / ``exit_fractions``: samples per exit (the histogram; final exit last);
    ``accuracy_per_exit``: accuracy (fraction) of the samples that left at each exit (None where none
    did); ``accuracy``: of the early-exit network; ``accuracy_final``: the same network with exits
    disabled; ``agreement``: share of samples predicted like the final exit; ``expected_macs``:
    MACs per sample implied by the exit fractions (segment and head MACs from the profiler);
    ``full_macs``: MACs per sample with exits disabled; ``seconds`` / ``seconds_final``: wall-clock
    of one pass over the data at ``batch_size`` with and without exits (a single pass, for a rough
    comparison; use :func:`moco.bench.compare` for a fair timing). Accuracies are None without labels.
    """

    n: int
    batch_size: int
    exit_counts: tuple[int, ...]
    exit_fractions: tuple[float, ...]
    accuracy_per_exit: tuple[float | None, ...]
    accuracy: float | None
    accuracy_final: float | None
    agreement: float
    expected_macs: float
    full_macs: float
    seconds: float | None
    seconds_final: float | None
    points: tuple[str, ...]

    @property
    def macs_reduction(self) -> float:
        """``full_macs / expected_macs`` (> 1: fewer MACs with exits)."""
        return self.full_macs / self.expected_macs if self.expected_macs > 0 else math.inf

    @property
    def time_ratio(self) -> float | None:
        """``seconds / seconds_final`` (< 1: faster with exits); None when not timed."""
        if self.seconds is None or self.seconds_final is None:
            return None
        return self.seconds / self.seconds_final if self.seconds_final > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the fields plus ``macs_reduction`` and ``time_ratio``."""
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
        out["macs_reduction"] = self.macs_reduction
        out["time_ratio"] = self.time_ratio
        return out

    def to_text(self) -> str:
        """Exit histogram and accuracy per exit as a table, then the totals."""
        names = [*self.points, "final"]
        header = ("exit", "after", "samples", "share", "accuracy", "")
        rows = []
        for i, name in enumerate(names):
            acc = self.accuracy_per_exit[i]
            bar = "#" * int(round(self.exit_fractions[i] * 40))
            rows.append((str(i), name, f"{self.exit_counts[i]:,}", f"{self.exit_fractions[i]:.1%}",
                         "-" if acc is None else f"{acc:.2%}", bar))
        widths = [max(len(r[j]) for r in (header, *rows)) for j in range(len(header))]
        lines = ["  ".join(c.ljust(w) if j < 2 or j == 5 else c.rjust(w)
                           for j, (c, w) in enumerate(zip(r, widths))).rstrip() for r in (header, *rows)]
        lines.insert(1, "-" * len(lines[0]))
        acc = "" if self.accuracy is None else (
            f"accuracy {self.accuracy:.2%} with exits vs {self.accuracy_final:.2%} without "
            f"(drop {(self.accuracy_final - self.accuracy) * 100:.2f} points); ")
        lines.append(f"{acc}agreement with the final exit {self.agreement:.2%}")
        timed = "" if self.time_ratio is None else (
            f"; one pass at batch {self.batch_size}: {self.seconds:.3f} s vs {self.seconds_final:.3f} s "
            f"(time ratio {self.time_ratio:.2f})")
        lines.append(f"expected {self.expected_macs / 1e6:.3f} M MACs per sample vs {self.full_macs / 1e6:.3f} M "
                     f"({self.macs_reduction:.2f}x fewer){timed}")
        return "\n".join(lines)

    def to_frame(self):
        """One row per exit: samples that left there, their share and accuracy."""
        import pandas as pd

        return pd.DataFrame([{"exit": i, "count": c, "fraction": f, "accuracy": a} for i, (c, f, a) in
                             enumerate(zip(self.exit_counts, self.exit_fractions, self.accuracy_per_exit))])

    def __str__(self) -> str:
        return self.to_text()


@torch.inference_mode()
def evaluate_exits(net: EarlyExitNetwork, data: Any, *, batch_size: int = 256) -> ExitReport:
    """Run ``net`` with and without exits over ``data`` (eval mode, flags restored) and report.

    ``data``: a tensor, ``(x, y)``, Dataset or DataLoader; accuracies need labels.
    """
    if not isinstance(net, EarlyExitNetwork):
        raise TypeError(f"net must be an EarlyExitNetwork, not {type(net).__name__}")
    flags = [(m, m.training) for m in net.modules()]
    net.eval()
    preds, exits, finals, labels = [], [], [], []
    seconds = seconds_final = 0.0
    try:
        for x, y in iter_batches(data, batch_size):
            t0 = time.perf_counter()
            out, ex = net(x)
            t1 = time.perf_counter()
            fin = net.forward_final(x)
            t2 = time.perf_counter()
            seconds += t1 - t0
            seconds_final += t2 - t1
            preds.append(out.argmax(1))
            exits.append(ex)
            finals.append(fin.argmax(1))
            if y is not None:
                labels.append(y.long())
    finally:
        for m, flag in flags:
            m.training = flag
    if not preds:
        raise MocoError("the data is empty; pass at least one sample")
    pred, ex, fin = torch.cat(preds), torch.cat(exits), torch.cat(finals)
    y = torch.cat(labels) if len(labels) == len(preds) else None
    n, k = len(pred), net.num_exits
    counts = torch.bincount(ex, minlength=k).tolist()
    fractions = tuple(c / n for c in counts)
    per_exit: list[float | None] = []
    for i in range(k):
        sel = ex == i
        per_exit.append(None if y is None or not bool(sel.any()) else float((pred[sel] == y[sel]).float().mean()))
    return ExitReport(
        n=n, batch_size=batch_size, exit_counts=tuple(int(c) for c in counts), exit_fractions=fractions,
        accuracy_per_exit=tuple(per_exit),
        accuracy=None if y is None else float((pred == y).float().mean()),
        accuracy_final=None if y is None else float((fin == y).float().mean()),
        agreement=float((pred == fin).float().mean()),
        expected_macs=net.costs.expected_macs(fractions, net.enabled), full_macs=net.costs.full_macs,
        seconds=seconds, seconds_final=seconds_final, points=net.points,
    )


def summarize_outputs(net: EarlyExitNetwork, outputs: ExitOutputs) -> ExitReport:
    """The :class:`ExitReport` of ``net``'s current thresholds replayed on collected ``outputs`` (no timing).

    The cascade is simulated (:func:`moco.exits.outputs.simulate`), which gives the exits and
    predictions ``net(x)`` gives, without running the network again; ``seconds`` are None.
    """
    k, n = outputs.num_exits, outputs.n
    exit_at = simulate(outputs, net.thresholds, net.criterion)
    cols = np.arange(n)
    taken = outputs.predictions[exit_at, cols]
    final = outputs.predictions[-1]
    y = outputs.labels
    counts = np.bincount(exit_at, minlength=k)
    fractions = tuple(float(c) / n for c in counts)
    per_exit = tuple(None if y is None or counts[i] == 0 else float((taken[exit_at == i] == y[exit_at == i]).mean())
                     for i in range(k))
    return ExitReport(
        n=n, batch_size=0, exit_counts=tuple(int(c) for c in counts), exit_fractions=fractions,
        accuracy_per_exit=per_exit, accuracy=None if y is None else float((taken == y).mean()),
        accuracy_final=None if y is None else float((final == y).mean()), agreement=float((taken == final).mean()),
        expected_macs=net.costs.expected_macs(fractions, net.enabled), full_macs=net.costs.full_macs,
        seconds=None, seconds_final=None, points=net.points,
    )


@dataclass(frozen=True)
class TradeoffPoint:
    """One threshold setting: ``quantile`` (share of samples confident at each exit on its own),
    ``thresholds``, ``accuracy`` (fraction, None without labels), ``agreement`` with the final exit,
    ``expected_macs`` per sample and ``exit_fractions``."""

    quantile: float
    thresholds: tuple[float | None, ...]
    accuracy: float | None
    agreement: float
    expected_macs: float
    exit_fractions: tuple[float, ...]


@dataclass(frozen=True)
class TradeoffCurve:
    """Accuracy vs expected MACs per sample over threshold values (seed 004: "how low can MACs go")."""

    points: tuple[TradeoffPoint, ...]
    full_macs: float
    accuracy_final: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"full_macs": self.full_macs, "accuracy_final": self.accuracy_final,
                "points": [{"quantile": p.quantile, "thresholds": list(p.thresholds), "accuracy": p.accuracy,
                            "agreement": p.agreement, "expected_macs": p.expected_macs,
                            "exit_fractions": list(p.exit_fractions)} for p in self.points]}

    def to_frame(self):
        """One row per point of the curve: quantile, accuracy, agreement, expected MACs per sample."""
        import pandas as pd

        return pd.DataFrame([{"quantile": p.quantile, "accuracy": p.accuracy, "agreement": p.agreement,
                              "expected_macs": p.expected_macs} for p in self.points])

    def to_text(self) -> str:
        from moco.results import frame_text

        return (f"accuracy vs MACs over {len(self.points)} threshold settings (full model "
                f"{self.full_macs / 1e6:.3f} M MACs per sample)\n{frame_text(self.to_frame())}")

    def __str__(self) -> str:
        return self.to_text()

    def lowest_macs(self, min_accuracy: float) -> TradeoffPoint | None:
        """The point with the fewest expected MACs whose accuracy is >= ``min_accuracy`` (a fraction), if any."""
        ok = [p for p in self.points if p.accuracy is not None and p.accuracy >= min_accuracy]
        return min(ok, key=lambda p: p.expected_macs) if ok else None

    def plot(self, path: str | Path, *, mark: tuple[float, float] | None = None, title: str | None = None) -> Path:
        """Write the curve as a PNG (atomically): accuracy (or agreement) vs MACs per sample (millions).

        ``mark``: ``(expected_macs, accuracy)`` of an operating point to highlight (e.g. the calibrated one).
        """
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        use_acc = self.accuracy_final is not None
        xs = [p.expected_macs / 1e6 for p in self.points]
        ys = [(p.accuracy if use_acc else p.agreement) * 100 for p in self.points]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(xs, ys, "o-", ms=3, label="early exit, thresholds swept")
        if use_acc:
            ax.scatter([self.full_macs / 1e6], [self.accuracy_final * 100], marker="s", color="k",
                       label="exits disabled", zorder=3)
        if mark is not None:
            ax.scatter([mark[0] / 1e6], [mark[1] * 100], marker="*", s=150, color="C3", label="calibrated", zorder=4)
        ax.set_xlabel("expected MACs per sample (millions)")
        ax.set_ylabel("accuracy (%)" if use_acc else "agreement with the final exit (%)")
        ax.set_title(title or "accuracy vs MACs over exit thresholds")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        fig.tight_layout()
        path = Path(path)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
        plt.close(fig)
        return path


def tradeoff_curve(net: EarlyExitNetwork, outputs: ExitOutputs, *, n_points: int = 41) -> TradeoffCurve:
    """Accuracy and expected MACs per sample for ``n_points`` threshold settings, simulated on ``outputs``.

    Setting ``q`` in ``[0, 1]`` puts every exit's threshold at the score quantile where a share ``q``
    of the samples would be confident there on its own (``q = 0``: no exit); the cascade is then
    replayed (:func:`moco.exits.outputs.simulate`) with MACs from the profiler.
    """
    if isinstance(n_points, bool) or not isinstance(n_points, int) or n_points < 2:
        raise MocoError(f"n_points must be an int >= 2, got {n_points!r}")
    crit = net.criterion
    k, n = outputs.num_exits, outputs.n
    cols = np.arange(n)
    final = outputs.predictions[-1]
    y = outputs.labels
    pts = []
    for q in np.linspace(0.0, 1.0, n_points):
        if q == 0:
            thr: Sequence[float | None] = (None,) * (k - 1)
        else:
            level = 1.0 - q if crit.higher_is_confident else q
            thr = tuple(float(np.quantile(outputs.scores[i], level)) for i in range(k - 1))
        exit_at = simulate(outputs, thr, crit)
        taken = outputs.predictions[exit_at, cols]
        fractions = tuple(float(f) for f in np.bincount(exit_at, minlength=k) / n)
        pts.append(TradeoffPoint(
            quantile=float(q), thresholds=tuple(thr), accuracy=None if y is None else float((taken == y).mean()),
            agreement=float((taken == final).mean()),
            expected_macs=net.costs.expected_macs(fractions, [t is not None for t in thr]),
            exit_fractions=fractions,
        ))
    return TradeoffCurve(tuple(pts), net.costs.full_macs, None if y is None else float((final == y).mean()))
