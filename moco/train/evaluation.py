"""Evaluation: accuracy and loss of a classifier on labelled data, and batched predictions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moco.batches import check_labels, iter_batches
from moco.errors import MocoError, input_error

__all__ = ["Evaluation", "evaluate", "predict"]


@dataclass(frozen=True)
class Evaluation:
    """Accuracy (fraction in [0, 1]) and mean cross-entropy loss over ``n`` samples."""

    accuracy: float
    loss: float
    n: int


def _check_batch(x: torch.Tensor, y: torch.Tensor | None, num_classes: int | None = None,
                 what: str = "labels") -> torch.Tensor:
    if y is None:
        raise MocoError("training and evaluation need labels: pass (x, y), a labelled Dataset or a DataLoader")
    if not torch.isfinite(x).all():
        raise MocoError("the inputs contain NaN or inf; clean or normalise the data first")
    return check_labels(y, num_classes, what=what)


def _device(model: nn.Module) -> torch.device:
    """Where ``model``'s weights are (the CPU for a model without parameters or buffers)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@torch.inference_mode()
def evaluate(model: nn.Module, data: Any, *, batch_size: int = 1000) -> Evaluation:
    """Accuracy and mean cross-entropy of ``model`` (in eval mode, restored afterwards) on labelled ``data``.

    Batches are moved to the device the model's weights are on (the CPU unless it is trained on a GPU).
    """
    was_training = model.training
    model.eval()
    device = _device(model)
    total_loss, correct, seen = 0.0, 0, 0
    try:
        for x, y in iter_batches(data, batch_size):
            y = _check_batch(x, y)
            x, y = x.to(device), y.to(device)
            try:
                logits = model(x)
            except RuntimeError as exc:
                if seen or isinstance(exc, torch.cuda.OutOfMemoryError):
                    raise
                raise input_error(exc, tuple(x.shape)) from None
            check_labels(y, int(logits.shape[-1]), what="labels")  # a label >= the model's classes: a clear error
            total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            seen += len(x)
    finally:
        model.train(was_training)
    if seen == 0:
        raise MocoError("evaluation data is empty")
    return Evaluation(correct / seen, total_loss / seen, seen)


@torch.inference_mode()
def predict(model: nn.Module, data: Any, *, batch_size: int = 1000) -> torch.Tensor:
    """Model outputs (logits ``[N, classes]``) for all of ``data``, in eval mode, batched (on the model's device)."""
    was_training = model.training
    model.eval()
    device = _device(model)
    outputs = []
    try:
        for x, _ in iter_batches(data, batch_size):
            try:
                outputs.append(model(x.to(device)))
            except RuntimeError as exc:
                if outputs or isinstance(exc, torch.cuda.OutOfMemoryError):
                    raise
                raise input_error(exc, tuple(x.shape)) from None
        return torch.cat(outputs)
    finally:
        model.train(was_training)
