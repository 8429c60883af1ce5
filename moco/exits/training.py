"""Training the exits: joint (BranchyNet: backbone and heads, ``loss = sum_i w_i * CE_i``) or retrofit
(the trained backbone frozen, only the heads learn; the model's weights and its predictions stay as
they were). The loop is moco's training engine on Lightning (:class:`moco.train.engine.ExitModule`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from moco.batches import iter_batches, num_samples
from moco.errors import MocoError
from moco.exits.network import EarlyExitNetwork
from moco.train import check_distillation

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
    """Accuracy (fraction) of every exit on every sample of labelled ``data``, in eval mode (flags restored).

    Batches go to the device the network's weights are on."""
    from moco.train.evaluation import _device

    flags = [(m, m.training) for m in net.modules()]
    net.eval()
    device = _device(net)
    correct, seen = [0] * net.num_exits, 0
    try:
        for x, y in iter_batches(data, batch_size):
            if y is None:
                raise MocoError("exit accuracies need labels: pass (x, y) or a labelled Dataset")
            x, y = x.to(device), y.to(device)
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
    on_epoch: Callable[[ExitEpochLog], Any] | None = None,
    callbacks: Sequence[Any] | None = None,
    logger: Any = None,
    accelerator: str = "cpu",
    devices: int | str | Sequence[int] = 1,
    precision: str | int = "32-true",
    trainer_kwargs: dict | None = None,
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

    The loop is moco's training engine on Lightning (:class:`moco.train.engine.ExitModule`);
    ``on_epoch`` (a callable receiving each :class:`ExitEpochLog`), ``callbacks``, ``logger``,
    ``accelerator``, ``devices``, ``precision`` and ``trainer_kwargs`` work as in :func:`moco.train.fit`
    (the logged metrics are ``loss``, ``train_accuracy_i`` and ``val_accuracy_i`` per exit ``i``).
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
    num_samples(train_data)  # a clear TypeError for data of the wrong kind
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
    from moco.train.engine import ExitModule, run_training  # imports Lightning (seconds)

    module = ExitModule(net, opt, mode=mode, weights=w, epochs=epochs, lr=lr, schedule=schedule,
                        distillation=distillation, temperature=temperature, val_data=val_data)
    hparams = dict(mode=mode, weights=list(w), epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                   weight_decay=weight_decay, schedule=schedule, distillation=distillation, temperature=temperature,
                   seed=seed)
    flags = [(m, m.training) for m in net.modules()]
    t0 = time.perf_counter()
    try:
        run_training(module, train_data, epochs=epochs, batch_size=batch_size, seed=seed, progress=progress,
                     write=tqdm.write if progress else None, on_epoch=on_epoch, callbacks=callbacks, logger=logger,
                     accelerator=accelerator, devices=devices, precision=precision, trainer_kwargs=trainer_kwargs,
                     hparams=hparams)
    finally:
        for m, flag in flags:
            m.training = flag
    return ExitTrainResult(mode, w, tuple(module.history), time.perf_counter() - t0)
