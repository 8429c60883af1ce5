"""Every exit evaluated once on a data set (:class:`ExitOutputs`), and the cascade simulated on it.

Calibration and the accuracy-vs-MACs curve try many threshold vectors; running the network for each
would be wasteful, so the scores and predictions of every exit on every sample are computed once
(:func:`collect_outputs`) and :func:`simulate` replays the cascade: a sample leaves at the first
enabled exit whose criterion passes. This is exactly what :meth:`EarlyExitNetwork.forward` computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from moco.batches import check_labels, iter_batches, num_samples
from moco.errors import MocoError
from moco.exits.criteria import Criterion
from moco.exits.network import EarlyExitNetwork
from moco.progress import show_progress

__all__ = ["ExitOutputs", "collect_outputs", "simulate", "risk_events"]

METRICS = ("accuracy_drop", "disagreement")


@dataclass(frozen=True)
class ExitOutputs:
    """Scores and predictions of every exit on ``n`` samples.

    ``scores``: float64 ``[K - 1, n]``, the criterion's score at each early exit; ``predictions``:
    int64 ``[K, n]``, argmax class at every exit (final last); ``labels``: int64 ``[n]`` or None.
    """

    scores: np.ndarray
    predictions: np.ndarray
    labels: np.ndarray | None

    @property
    def n(self) -> int:
        return int(self.predictions.shape[1])

    @property
    def num_exits(self) -> int:
        return int(self.predictions.shape[0])

    def subset(self, idx: np.ndarray) -> "ExitOutputs":
        """The outputs of the samples ``idx``."""
        return ExitOutputs(self.scores[:, idx], self.predictions[:, idx],
                           None if self.labels is None else self.labels[idx])


@torch.inference_mode()
def collect_outputs(net: EarlyExitNetwork, data: Any, *, batch_size: int = 512, progress: bool = False) -> ExitOutputs:
    """Run every exit of ``net`` (eval mode, flags restored) on ``data``: tensor, ``(x, y)``, Dataset or DataLoader."""
    if not isinstance(net, EarlyExitNetwork):
        raise TypeError(f"net must be an EarlyExitNetwork, not {type(net).__name__}")
    flags = [(m, m.training) for m in net.modules()]
    net.eval()
    scores, preds, labels = [], [], []
    has_labels = True
    try:
        bar = tqdm(total=num_samples(data), desc="exit outputs", unit="img", disable=not show_progress(progress), leave=False)
        for x, y in iter_batches(data, batch_size):
            outs = net.forward_all(x)
            scores.append(torch.stack([net.criterion.score(o) for o in outs[:-1]]).double())
            preds.append(torch.stack([o.argmax(1) for o in outs]))
            if y is None:
                has_labels = False
            else:
                labels.append(check_labels(y, net.num_classes))
            bar.update(len(x))
        bar.close()
    finally:
        for m, flag in flags:
            m.training = flag
    if not preds:
        raise MocoError("the data is empty; pass at least one sample")
    return ExitOutputs(
        torch.cat(scores, 1).numpy(), torch.cat(preds, 1).numpy(),
        torch.cat(labels).numpy() if has_labels and labels else None,
    )


def simulate(outputs: ExitOutputs, thresholds: Sequence[float | None], criterion: Criterion) -> np.ndarray:
    """Exit index (int64 ``[n]``) each sample takes under ``thresholds`` (None = exit disabled)."""
    k = outputs.num_exits
    if len(thresholds) != k - 1:
        raise MocoError(f"thresholds needs {k - 1} values (one per early exit), got {len(thresholds)}")
    exit_at = np.full(outputs.n, k - 1, dtype=np.int64)
    active = np.ones(outputs.n, dtype=bool)
    for i, t in enumerate(thresholds):
        if t is None:
            continue
        leave = active & criterion.exits(outputs.scores[i], t)
        exit_at[leave] = i
        active &= ~leave
    return exit_at


def risk_events(outputs: ExitOutputs, metric: str) -> np.ndarray:
    """Bool ``[K, n]``: whether leaving at exit ``i`` is a *bad event* for the sample (final row all False).

    ``"accuracy_drop"``: the exit is wrong and the final exit right (its rate bounds the accuracy
    drop from above); ``"disagreement"``: the exit predicts another class than the final exit.
    """
    if metric not in METRICS:
        raise MocoError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    final = outputs.predictions[-1]
    if metric == "accuracy_drop":
        if outputs.labels is None:
            raise MocoError("metric='accuracy_drop' needs labels: pass (x, y) data, or use metric='disagreement'")
        y = outputs.labels
        return (outputs.predictions != y[None, :]) & (final == y)[None, :]
    return outputs.predictions != final[None, :]
