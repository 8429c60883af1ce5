"""Training the exits: joint (BranchyNet: backbone and heads, ``loss = sum_i w_i * CE_i``) or retrofit
(the trained backbone frozen, only the heads learn; the model's weights and its predictions stay as
they were).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from moco.batches import check_labels, iter_batches, num_samples
from moco.errors import MocoError
from moco.exits.network import EarlyExitNetwork
from moco.train import check_distillation, distillation_loss

__all__ = ["ExitEpochLog", "ExitTrainResult", "train_exits", "default_weights", "exit_accuracies"]

MODES = ("joint", "retrofit")


@dataclass(frozen=True)
class ExitEpochLog:
    """One epoch: mean weighted loss, per-exit running train accuracy and validation accuracy (fractions), seconds."""

    epoch: int
    loss: float
    train_accuracy: tuple[float, ...]
    val_accuracy: tuple[float, ...] | None
    seconds: float


@dataclass(frozen=True)
class ExitTrainResult:
    """What :func:`train_exits` did: ``mode``, the loss ``weights`` used and the per-epoch ``history``."""

    mode: str
    weights: tuple[float, ...]
    history: tuple[ExitEpochLog, ...]
    seconds: float

    def to_dict(self) -> dict:
        """JSON-safe: mode, weights, seconds and the per-epoch history."""
        from dataclasses import asdict

        from moco.results import json_safe

        return json_safe({"mode": self.mode, "weights": list(self.weights), "seconds": self.seconds,
                          "history": [asdict(h) for h in self.history]})

    def to_frame(self):
        """One row per epoch: loss, train accuracy of each exit (``train_acc_i``), seconds."""
        import pandas as pd

        return pd.DataFrame([{"epoch": h.epoch, "loss": h.loss,
                              **{f"train_acc_{i}": a for i, a in enumerate(h.train_accuracy)},
                              **({f"val_acc_{i}": a for i, a in enumerate(h.val_accuracy)} if h.val_accuracy else {}),
                              "seconds": h.seconds} for h in self.history])

    def to_text(self) -> str:
        from moco.results import frame_text

        return f"exit training ({self.mode}, weights {list(self.weights)}, {self.seconds:.1f} s)\n{frame_text(self.to_frame())}"

    def __str__(self) -> str:
        return self.to_text()


def default_weights(num_exits: int) -> tuple[float, ...]:
    """Seed 004's loss weights: 1.0 for the first exit, 0.3 for every other exit (the final one included)."""
    return (1.0,) + (0.3,) * (num_exits - 1)


def _check_weights(weights: Any, k: int, mode: str) -> tuple[float, ...]:
    if weights is None:
        return default_weights(k)
    if not isinstance(weights, (list, tuple)):
        raise TypeError(f"weights must be a list of floats, one per exit, not {type(weights).__name__}")
    w = list(weights)
    if mode == "retrofit" and len(w) == k - 1:
        w = [*w, 0.0]
    if len(w) != k:
        extra = f" (or {k - 1}: the early exits only, in retrofit mode)" if mode == "retrofit" else ""
        raise MocoError(f"weights has {len(w)} entries but the network has {k} exits (the final one included); "
                        f"give {k}{extra}")
    for v in w:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise MocoError(f"loss weights must be finite numbers >= 0, got {weights}")
    if sum(w[:-1] if mode == "retrofit" else w) <= 0:
        raise MocoError(f"loss weights {weights} are all zero for the exits that train; nothing would learn")
    return tuple(float(v) for v in w)


@torch.inference_mode()
def exit_accuracies(net: EarlyExitNetwork, data: Any, *, batch_size: int = 512) -> tuple[float, ...]:
    """Accuracy (fraction) of every exit on every sample of labelled ``data``, in eval mode (flags restored)."""
    flags = [(m, m.training) for m in net.modules()]
    net.eval()
    correct, seen = [0] * net.num_exits, 0
    try:
        for x, y in iter_batches(data, batch_size):
            if y is None:
                raise MocoError("exit accuracies need labels: pass (x, y) or a labelled Dataset")
            for i, logits in enumerate(net.forward_all(x)):
                correct[i] += int((logits.argmax(1) == y).sum())
            seen += len(x)
    finally:
        for m, flag in flags:
            m.training = flag
    if seen == 0:
        raise MocoError("evaluation data is empty")
    return tuple(c / seen for c in correct)


def train_exits(
    net: EarlyExitNetwork,
    train_data: Any,
    *,
    mode: str = "joint",
    weights: Sequence[float] | None = None,
    epochs: int = 1,
    batch_size: int = 128,
    lr: float = 1e-3,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    schedule: str = "constant",
    distillation: float = 0.0,
    temperature: float = 3.0,
    seed: int = 0,
    val_data: Any = None,
    progress: bool = True,
) -> ExitTrainResult:
    """Train the exits of ``net`` on labelled ``train_data``; returns the per-epoch history.

    ``mode="joint"`` (BranchyNet) trains the backbone and the heads on
    ``loss = sum_i weights[i] * CE(exit_i, y)``; this changes the model's weights (they are the
    network's segments). ``mode="retrofit"`` keeps the backbone frozen (run under ``no_grad`` in eval
    mode, so its BatchNorm statistics do not move either, and only up to the last exit point) and
    trains only the heads on ``sum_i weights[i] * CE_i`` over the early exits: the model, and so the
    final exit, is unchanged (its train accuracy is logged as NaN; ``val_data`` measures it).

    ``weights``: one per exit, final last (retrofit also accepts one per early exit); default
    :func:`default_weights` (seed 004: 1.0 for the first exit, 0.3 for the others).
    ``schedule``: ``"constant"`` or ``"cosine"`` (learning rate annealed to 0 over all steps).
    ``distillation`` (in [0, 1]): self-distillation of every early exit from the final exit (Phuong &
    Lampert 2019): exit ``i``'s term becomes ``(1 - d) * CE_i + d * T^2 * KL(softmax(final / T) ||
    softmax(exit_i / T))`` with the final exit's output detached (``T = temperature``). It teaches the
    early exits to agree with the final one, which is what calibration for accuracy drop or
    disagreement rewards; in retrofit mode the frozen backbone then runs to the end (the final exit
    is still unchanged).
    Shuffling is seeded by ``seed`` without touching the global RNG. Each epoch logs the per-exit
    running train accuracy, and the per-exit accuracy on ``val_data`` when given (a progress bar
    with ``progress``). Training flags are restored afterwards.
    """
    if not isinstance(net, EarlyExitNetwork):
        raise TypeError(f"net must be an EarlyExitNetwork (from attach_exits), not {type(net).__name__}")
    if mode not in MODES:
        raise MocoError(f"mode must be 'joint' or 'retrofit', got {mode!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise MocoError(f"epochs must be an int >= 1, got {epochs!r}")
    if schedule not in ("constant", "cosine"):
        raise MocoError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    check_distillation(distillation, temperature)
    k = net.num_exits
    w = _check_weights(weights, k, mode)
    n = num_samples(train_data)
    params = list(net.parameters()) if mode == "joint" else list(net.heads.parameters())
    params = [p for p in params if p.requires_grad]
    if not params:
        raise MocoError("nothing to train: the network has no trainable parameters")
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    else:
        raise MocoError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    steps = epochs * math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if schedule == "cosine" else None
    flags = [(m, m.training) for m in net.modules()]
    history: list[ExitEpochLog] = []
    t0 = time.perf_counter()
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            gen = torch.Generator().manual_seed(seed)
            for epoch in range(epochs):
                gen.manual_seed(seed * 100_003 + epoch)
                if mode == "joint":
                    net.train()
                else:
                    net.segments.eval()
                    net.heads.train()
                te = time.perf_counter()
                total, seen = 0.0, 0
                correct = [0] * k
                bar = tqdm(total=n, desc=f"exits {mode} {epoch + 1}/{epochs}", unit="img", disable=not progress,
                           leave=False)
                for x, y in iter_batches(train_data, batch_size, shuffle=True, generator=gen):
                    if y is None:
                        raise MocoError("training needs labels: pass (x, y), a labelled Dataset or a DataLoader")
                    y = check_labels(y, net.num_classes, what="training labels")
                    if mode == "joint":
                        outs = net.forward_all(x)
                    else:  # the frozen backbone runs only up to the last exit point: the final exit cannot change
                        with torch.no_grad():
                            h, acts = x, []
                            for segment in net.segments[:-1]:
                                h = segment(h)
                                acts.append(h)
                            teacher = net.segments[-1](h) if distillation > 0 else None
                        outs = [head(a) for head, a in zip(net.heads, acts)]
                    losses = [F.cross_entropy(o, y) for o in outs]
                    if distillation > 0:
                        final = outs[-1] if mode == "joint" else teacher
                        for i in range(k - 1):
                            losses[i] = ((1 - distillation) * losses[i]
                                         + distillation * distillation_loss(outs[i], final, temperature))
                    loss = sum(wi * li for wi, li in zip(w, losses) if wi > 0)
                    if not torch.isfinite(loss):
                        raise MocoError(f"training diverged (loss {float(loss)}) in epoch {epoch + 1}; lower lr={lr}")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if sched is not None:
                        sched.step()
                    total += loss.item() * len(x)
                    seen += len(x)
                    for i, o in enumerate(outs):
                        correct[i] += int((o.detach().argmax(1) == y).sum())
                    bar.update(len(x))
                    bar.set_postfix(loss=f"{total / seen:.4f}", acc0=f"{correct[0] / seen:.3f}")
                bar.close()
                train_acc = tuple(c / max(seen, 1) if i < len(outs) else math.nan for i, c in enumerate(correct))
                val_acc = exit_accuracies(net, val_data) if val_data is not None else None
                log = ExitEpochLog(epoch + 1, total / max(seen, 1), train_acc, val_acc, time.perf_counter() - te)
                history.append(log)
                if progress:
                    accs = " ".join(f"{a:.4f}" for a in train_acc)
                    val = f", val acc per exit {' '.join(f'{a:.4f}' for a in val_acc)}" if val_acc else ""
                    tqdm.write(f"exits {mode} epoch {log.epoch}: loss {log.loss:.4f}, train acc per exit {accs}{val} "
                               f"({log.seconds:.1f} s)")
    finally:
        for m, flag in flags:
            m.training = flag
    return ExitTrainResult(mode, w, tuple(history), time.perf_counter() - t0)
