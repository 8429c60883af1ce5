"""``fit``: train a classifier with cross-entropy (optionally distilled from a teacher) on moco's training
engine (:mod:`moco.train.engine`, Lightning's ``Trainer``); seeded, resumable, with a progress bar.

This module imports Lightning only when ``fit`` runs (it takes seconds to import), so ``import moco.train``
stays fast.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from moco.batches import num_samples
from moco.errors import MocoError

__all__ = ["EpochLog", "FitResult", "check_distillation", "distillation_loss", "fit"]


@dataclass(frozen=True)
class EpochLog:
    """One epoch of training: mean loss, running train accuracy, optional validation accuracy, seconds."""

    epoch: int
    loss: float
    train_accuracy: float
    val_accuracy: float | None
    seconds: float


@dataclass(frozen=True)
class FitResult:
    """What ``fit`` did: the per-epoch history and why it stopped (``"epochs"``, ``"target"``, ``"resumed-done"``)."""

    history: tuple[EpochLog, ...]
    stopped: str
    seconds: float

    @property
    def final_train_accuracy(self) -> float:
        return self.history[-1].train_accuracy if self.history else float("nan")


def _make_optimizer(model: nn.Module, optimizer: str, lr: float, momentum: float, weight_decay: float):
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise MocoError("the model has no trainable parameters; unfreeze some before calling fit")
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise MocoError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")


def check_distillation(distillation: float, temperature: float) -> None:
    """Raise MocoError unless ``distillation`` is a weight in [0, 1] and ``temperature`` a number > 0."""
    for name, value in (("distillation", distillation), ("temperature", temperature)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise MocoError(f"{name} must be a number, got {value!r}")
    if not 0.0 <= distillation <= 1.0:
        raise MocoError(f"distillation is a weight in [0, 1], got {distillation!r}")
    if temperature <= 0:
        raise MocoError(f"temperature must be > 0, got {temperature!r}")


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Knowledge-distillation term (Hinton et al. 2015): ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``.

    ``student`` and ``teacher`` are logits ``[B, C]``; the teacher's are detached (no gradient flows to
    them); averaged over the batch. The ``T^2`` keeps its gradient scale comparable to cross-entropy's.
    """
    soft = F.log_softmax(teacher.detach() / temperature, dim=1)
    kl = F.kl_div(F.log_softmax(student / temperature, dim=1), soft, reduction="batchmean", log_target=True)
    return temperature**2 * kl


def _package_save(*args: Any, **kwargs: Any) -> Path:
    """``moco.train.save_checkpoint``, looked up on the package when called (not bound at import), so a
    replaced ``moco.train.save_checkpoint`` (the tests simulate a crash right after a checkpoint) is the
    one the per-epoch checkpoint uses."""
    return sys.modules["moco.train"].save_checkpoint(*args, **kwargs)


def fit(
    model: nn.Module,
    train_data: Any,
    *,
    epochs: int = 1,
    batch_size: int = 128,
    lr: float = 1e-3,
    optimizer: str = "adam",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    schedule: str = "constant",
    teacher: nn.Module | None = None,
    distillation: float = 0.5,
    temperature: float = 4.0,
    seed: int = 0,
    target_train_accuracy: float | None = None,
    val_data: Any = None,
    checkpoint: str | Path | None = None,
    arch: dict | None = None,
    progress: bool = True,
    on_epoch: Callable[[EpochLog], Any] | None = None,
    callbacks: Sequence[Any] | None = None,
    logger: Any = None,
    accelerator: str = "cpu",
    devices: int | str | Sequence[int] = 1,
    precision: str | int = "32-true",
    trainer_kwargs: dict | None = None,
) -> FitResult:
    """Train ``model`` in place with cross-entropy and return the history.

    ``train_data`` is an ``(x, y)`` pair, a labelled Dataset or a DataLoader. Shuffling and dropout are
    seeded by ``seed`` without touching the caller's global RNG state. Training stops after ``epochs``
    or, when ``target_train_accuracy`` (a fraction, e.g. 0.9) is given, after the first epoch whose
    running train accuracy reaches it. With ``checkpoint=PATH`` the model and optimizer are saved
    atomically after every epoch and an interrupted run resumes from the last finished epoch.
    ``schedule``: ``"constant"`` learning rate, or ``"cosine"`` (annealed from ``lr`` to 0 over all
    ``epochs``, step by step; computed from the step index, so a resumed run continues the same curve).
    ``teacher``: knowledge distillation (Hinton et al. 2015) from another model, run in eval mode
    without gradients (e.g. the original before compression): the loss becomes ``(1 - distillation)
    * CE + distillation * T^2 * KL(softmax(teacher / T) || softmax(model / T))`` with ``T = temperature``.

    The loop is moco's training engine on Lightning's ``Trainer`` (:mod:`moco.train.engine`); these
    optional arguments reach it (the defaults train on the CPU, as before):

    * ``on_epoch``: a callable receiving each :class:`EpochLog` as its epoch finishes (in the calling
      process; under DDP on global rank 0 only), e.g. to log per-epoch metrics to MLflow;
    * ``callbacks``: extra ``lightning.pytorch.Callback`` objects (they run after moco's own, so at
      ``on_train_epoch_end`` ``pl_module.history[-1]`` is the epoch's log and ``trainer.callback_metrics``
      holds ``loss``, ``train_accuracy`` and ``val_accuracy``: ``EarlyStopping(monitor="train_accuracy",
      mode="max")`` works);
    * ``logger``: a Lightning logger (e.g. ``MLFlowLogger``, ``CSVLogger``) receiving the fit's settings
      as hyperparameters and the per-epoch metrics; none by default (no ``lightning_logs/`` folder);
    * ``accelerator`` (``"cpu"``, ``"gpu"``, ``"auto"``, ...), ``devices`` (a count, ``"auto"`` or a list;
      more than one device trains with DDP, each process on its shard of every epoch's seeded shuffle
      and ``batch_size`` per device), ``precision`` (``"32-true"``, ``"bf16-mixed"``, ``"16-mixed"``, ...);
    * ``trainer_kwargs``: any other ``Trainer`` argument (``strategy``, ``num_nodes``,
      ``gradient_clip_val``, ``accumulate_grad_batches``, ``max_time``, ...).

    The model ends on the CPU with its training flag (and the teacher's) as it was before.
    """
    if epochs < 1:
        raise MocoError(f"epochs must be >= 1, got {epochs}")
    if schedule not in ("constant", "cosine"):
        raise MocoError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    if target_train_accuracy is not None and not 0 < target_train_accuracy <= 1:
        raise MocoError(f"target_train_accuracy is a fraction in (0, 1], got {target_train_accuracy}")
    if teacher is not None:
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
        if teacher is model:
            raise MocoError("teacher is the model being trained; pass a separate model (e.g. the original)")
        check_distillation(distillation, temperature)
    num_samples(train_data)  # fails early with a clear TypeError for unsupported data
    from moco.train.engine import ClassifierModule, check_options, run_training  # imports Lightning (seconds)

    check_options(on_epoch=on_epoch, callbacks=callbacks, logger=logger, trainer_kwargs=trainer_kwargs)
    opt = _make_optimizer(model, optimizer, lr, momentum, weight_decay)
    history: list[EpochLog] = []
    start_epoch = 0
    if checkpoint is not None and Path(checkpoint).exists():
        from moco.train.checkpoint import _read_checkpoint

        state = _read_checkpoint(checkpoint)
        model.load_state_dict(state["state_dict"])
        if "optimizer" in state:
            opt.load_state_dict(state["optimizer"])
        history = [EpochLog(**h) for h in state.get("meta", {}).get("history", [])]
        start_epoch = len(history)
        if history and target_train_accuracy is not None and history[-1].train_accuracy >= target_train_accuracy:
            return FitResult(tuple(history), "resumed-done", 0.0)
    t0 = time.perf_counter()
    if start_epoch >= epochs:  # a finished run resumed: nothing left to train
        return FitResult(tuple(history), "epochs", time.perf_counter() - t0)
    module = ClassifierModule(model, opt, lr=lr, schedule=schedule, epochs=epochs, teacher=teacher,
                              distillation=distillation, temperature=temperature, val_data=val_data,
                              val_batch_size=max(batch_size, 512))
    module.history = history

    def save(hist: list[EpochLog]) -> None:
        _package_save(model, checkpoint, arch=arch, meta={"history": [asdict(h) for h in hist]}, optimizer=opt)

    def reached(log: EpochLog) -> bool:
        return log.train_accuracy >= target_train_accuracy

    hparams = dict(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, momentum=momentum,
                   weight_decay=weight_decay, schedule=schedule, distillation=distillation if teacher is not None else 0.0,
                   temperature=temperature, seed=seed, target_train_accuracy=target_train_accuracy)
    was_training = model.training
    teacher_was_training = teacher.training if teacher is not None else False
    try:
        stopped = run_training(
            module, train_data, epochs=epochs, start_epoch=start_epoch, batch_size=batch_size, seed=seed,
            progress=progress, write=tqdm.write if progress else None, save=save if checkpoint is not None else None,
            target=reached if target_train_accuracy is not None else None, on_epoch=on_epoch, callbacks=callbacks,
            logger=logger, accelerator=accelerator, devices=devices, precision=precision,
            trainer_kwargs=trainer_kwargs, hparams=hparams)
    finally:
        model.train(was_training)
        if teacher is not None:
            teacher.train(teacher_was_training)
    return FitResult(tuple(module.history), stopped, time.perf_counter() - t0)
