"""Fine-tuning after compression: a few epochs of :func:`moco.train.fit` on the new (smaller) model.

Surgery keeps the surviving weights, so a short fine-tune (1-3 epochs, a smaller learning rate than
training from scratch) recovers most of what pruning cost. ``finetune`` trains the model it is given
*in place*: it is meant for the new model that :func:`moco.compress.surgery.apply` returned, never the
user's original. ``keep=`` fine-tunes a zero-masked model instead, holding its pruned units at zero.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from moco.batches import num_samples
from moco.errors import MocoError


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
    progress: bool = True,
):
    """Fine-tune ``model`` (trained in place; pass the new model, e.g. from ``surgery.apply``).

    ``train_data``: ``(x, y)`` tensors, a labelled Dataset or a DataLoader. ``epochs`` full passes with
    cross-entropy, ``optimizer`` ``"adam"`` or ``"sgd"`` (momentum 0.9) at learning rate ``lr``,
    seeded shuffling (``seed``); ``val_data`` adds a validation accuracy per epoch (a fraction) to the
    history; ``progress`` shows a bar per epoch. ``keep`` (optional, ``{layer: kept indices}``): the
    model is a zero-masked one (seed 003's emulation, :func:`moco.compress.prune.masked_copy`) and the
    units not kept stay exactly zero (their gradients are masked). Returns :class:`moco.train.FitResult`
    (per-epoch loss, train / validation accuracy, seconds).
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
                  weight_decay=weight_decay, progress=progress)
    if keep is None:
        return fit(model, train_data, **kwargs)
    with _HoldMasked(_mask_tensors(model, _check_keep(model, keep))):
        return fit(model, train_data, **kwargs)
