"""A linear scorer over layer activations: multinomial logistic regression trained by minibatch Adam.

One matrix ``W [D, K]`` and bias ``b [K]`` give every class's score ``s = x @ W + b`` at once, so a rule
set costs one matrix multiply at inference. Training streams minibatches from an array, a memmap or a
tensor, so peak memory stays near one batch beyond the features themselves.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from moco.progress import show_progress

__all__ = ["LinearScorer", "fit_linear_scorer", "rows_as_tensor", "score_rows"]


@dataclass(frozen=True)
class LinearScorer:
    """Scores ``x @ weight + bias`` for ``len(classes)`` classes; ``classes[k]`` is the label of column k."""

    weight: np.ndarray  # [D, K] float32
    bias: np.ndarray  # [K] float32
    classes: np.ndarray  # [K] int64
    fit_seconds: float
    epochs: int

    @property
    def n_features(self) -> int:
        return int(self.weight.shape[0])

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores ``[N, K]`` (logits) for features ``x`` ``[N, D]``."""
        w = torch.from_numpy(self.weight)
        return torch.addmm(torch.from_numpy(self.bias), x.to(w.dtype), w)


def rows_as_tensor(features, rows: np.ndarray) -> torch.Tensor:
    """Rows ``rows`` of ``features`` (array, memmap or tensor) as a float32 tensor ``[len(rows), D]``."""
    if isinstance(features, torch.Tensor):
        return features[torch.from_numpy(np.asarray(rows))].float()
    return torch.from_numpy(np.ascontiguousarray(features[rows], dtype=np.float32))


def score_rows(scorer: LinearScorer, features, rows: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Scores ``[len(rows), K]`` of the given rows, computed in batches (rows in the order given)."""
    out = np.empty((len(rows), len(scorer.classes)), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            out[start : start + len(chunk)] = scorer.scores(rows_as_tensor(features, chunk)).numpy()
    return out


def fit_linear_scorer(
    features,
    targets: np.ndarray,
    rows: np.ndarray,
    classes: np.ndarray,
    *,
    epochs: int = 10,
    batch_size: int = 512,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    min_steps: int = 300,
    seed: int = 0,
    progress: bool = True,
) -> LinearScorer:
    """Fit a multinomial logistic regression of ``targets`` (column indices into ``classes``) on ``features``.

    Only ``rows`` are used. Features are divided by one global scale (their std on a sample) for
    conditioning and the scale is folded back into the weights, so the result applies to raw features.
    The learning rate follows a one-cycle schedule; cost is about ``2 * epochs * len(rows) * D * K`` MACs.
    Small data gets more epochs so that at least ``min_steps`` optimizer steps are taken.
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    n_features = int(features.shape[1])
    n_classes = len(classes)
    probe = rows_as_tensor(features, np.sort(rng.choice(rows, size=min(len(rows), 2000), replace=False)))
    scale = float(probe.std()) or 1.0
    gen = torch.Generator().manual_seed(seed)
    weight = torch.zeros(n_features, n_classes, requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(rows) / batch_size)
    epochs = max(epochs, math.ceil(min_steps / steps_per_epoch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.1)
    y_all = torch.from_numpy(np.asarray(targets, dtype=np.int64))
    bar = tqdm(total=epochs * len(rows), desc="fit linear scorer", unit="row", disable=not show_progress(progress), leave=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        # one batch per epoch (small data): gather the rows once instead of every step
        whole = np.sort(rows) if steps_per_epoch == 1 else None
        x_whole = rows_as_tensor(features, whole) if whole is not None else None
        for _ in range(epochs):
            order = rows[torch.randperm(len(rows), generator=gen).numpy()]
            for start in range(0, len(order), batch_size):
                batch = np.sort(order[start : start + batch_size])  # sorted rows read a memmap sequentially
                x = x_whole if whole is not None else rows_as_tensor(features, batch)
                logits = (x @ weight) / scale + bias
                loss = F.cross_entropy(logits, y_all[torch.from_numpy(batch)])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(len(batch))
    bar.close()
    with torch.no_grad():
        w = (weight / scale).numpy().astype(np.float32)
        b = bias.detach().numpy().astype(np.float32)
    return LinearScorer(w, b, np.asarray(classes, dtype=np.int64), time.perf_counter() - t0, epochs)
