"""Fine-tuning after compression: a few epochs of :func:`moco.train.fit` on the new (smaller) model.

Surgery keeps the surviving weights, so a short fine-tune (1-3 epochs, a smaller learning rate than
training from scratch) recovers most of what pruning cost. ``finetune`` trains the model it is given
*in place*: it is meant for the new model that :func:`moco.compress.surgery.apply` returned, never the
user's original. ``keep=`` fine-tunes a zero-masked model instead, holding its pruned units at zero.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from moco.batches import num_samples
from moco.errors import MocoError

__all__ = ["finetune", "recalibrate_batchnorm"]


def finetune(
    model: nn.Module,
    train_data: Any,
    *,
    epochs: int = 2,
    lr: float = 1e-3,
    optimizer: str = "adam",
    batch_size: int = 128,
    seed: int = 0,
    val_data: Any = None,
    keep: Mapping[str, Any] | None = None,
    weight_decay: float = 0.0,
    schedule: str = "constant",
    teacher: nn.Module | None = None,
    distillation: float = 0.5,
    temperature: float = 4.0,
    progress: bool = True,
    on_epoch: Callable[[Any], Any] | None = None,
    callbacks: Sequence[Any] | None = None,
    logger: Any = None,
    accelerator: str = "cpu",
    devices: int | str | Sequence[int] = 1,
    precision: str | int = "32-true",
    trainer_kwargs: dict | None = None,
):
    """Fine-tune ``model`` (trained in place; pass the new model, e.g. from ``surgery.apply``).

    ``train_data``: ``(x, y)`` tensors, a labelled Dataset or a DataLoader. ``epochs`` full passes with
    cross-entropy, ``optimizer`` ``"adam"`` or ``"sgd"`` (momentum 0.9) at learning rate ``lr``,
    seeded shuffling (``seed``); ``schedule="cosine"`` anneals the rate to 0 over the epochs (the last
    epoch then settles the weights and BatchNorm statistics; see :func:`moco.train.fit`); ``teacher``
    (typically the original model) adds knowledge distillation with weight ``distillation`` at
    ``temperature``; ``val_data`` adds a validation accuracy per epoch (a fraction) to the history;
    ``progress`` shows a bar per epoch. ``keep`` (optional, ``{layer: kept indices}``): the
    model is a zero-masked one (seed 003's emulation, :func:`moco.compress.prune.masked_copy`) and the
    units not kept stay exactly zero (their gradients are masked). Returns :class:`moco.train.FitResult`
    (per-epoch loss, train / validation accuracy, seconds).

    It trains on moco's engine on Lightning through :func:`moco.train.fit`: ``on_epoch`` (a callable
    receiving each :class:`moco.train.EpochLog`), ``callbacks``, ``logger``, ``accelerator``,
    ``devices``, ``precision`` and ``trainer_kwargs`` are passed on to it (the defaults train on the CPU).
    """
    from moco.compress.prune import _HoldMasked, _check_keep, _mask_tensors
    from moco.train import fit

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise MocoError(f"epochs must be an int >= 1, got {epochs!r}")
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise MocoError(f"lr must be > 0, got {lr!r}")
    if num_samples(train_data) == 0:
        raise MocoError("train_data is empty; pass at least one labelled sample to fine-tune on")
    kwargs = dict(epochs=epochs, lr=lr, optimizer=optimizer, batch_size=batch_size, seed=seed, val_data=val_data,
                  weight_decay=weight_decay, schedule=schedule, teacher=teacher, distillation=distillation,
                  temperature=temperature, progress=progress, on_epoch=on_epoch, callbacks=callbacks, logger=logger,
                  accelerator=accelerator, devices=devices, precision=precision, trainer_kwargs=trainer_kwargs)
    if keep is None:
        return fit(model, train_data, **kwargs)
    with _HoldMasked(_mask_tensors(model, _check_keep(model, keep))):
        return fit(model, train_data, **kwargs)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data: Any, *, batch_size: int = 256, max_samples: int | None = 2000) -> int:
    """Re-estimate every BatchNorm's running mean and variance on ``data`` (in place); returns samples used.

    After surgery the statistics a BatchNorm kept describe the *original* network's inputs: removing
    channels upstream shifts what reaches it (a pruned unit's mean no longer adds into the next conv),
    and a network can fall to chance accuracy although its weights are fine. Forwarding a few batches
    in train mode with a cumulative average (``momentum=None``) restores the statistics without any
    gradient step (weights unchanged). ``data``: inputs ``x``, ``(x, y)``, a Dataset or a DataLoader
    (labels ignored); at most ``max_samples`` are used (None: all). Flags and momenta are restored.
    """
    from moco.batches import iter_batches

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    flags = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in norms]
    seen = 0
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: every batch counts the same
            m.train()
        for x, _ in iter_batches(data, batch_size):
            if max_samples is not None and seen >= max_samples:
                break
            if max_samples is not None:
                x = x[: max_samples - seen]
            model(x)
            seen += len(x)
    finally:
        for m, momentum in momenta:
            m.momentum = momentum
        for m, flag in flags:
            m.training = flag
    if seen == 0:
        raise MocoError("recalibrate_batchnorm got no samples; pass the training inputs (a few thousand are enough)")
    return seen
