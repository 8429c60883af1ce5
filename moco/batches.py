"""Uniform batching over what users pass as data: a tensor, an ``(x, y)`` pair, a Dataset or a DataLoader."""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from moco.errors import MocoError

__all__ = ["as_tensors", "check_labels", "iter_batches", "num_samples"]


def as_tensors(data: Any) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(x, y)`` tensors when ``data`` holds them in memory (tensor, pair, or a dataset with ``tensors()``).

    Returns None for data that can only be iterated (a generic Dataset or a DataLoader).
    """
    if isinstance(data, torch.Tensor):
        return data, None
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        if len(x) != len(y):
            raise MocoError(f"inputs and labels differ in length: {len(x)} vs {len(y)}; pass matching tensors")
        return x, y
    tensors = getattr(data, "tensors", None)
    if callable(tensors):
        x, y = tensors()
        return x, y
    if isinstance(data, torch.utils.data.TensorDataset):
        x, *rest = data.tensors
        return x, (rest[0] if rest else None)
    return None


def check_labels(y: torch.Tensor, num_classes: int | None = None, *, what: str = "labels") -> torch.Tensor:
    """``y`` as int64 class indices, or MocoError: labels must be integers (or integral floats) in
    ``0 .. num_classes - 1`` (the model's outputs) and not NaN."""
    if not isinstance(y, torch.Tensor):
        y = torch.as_tensor(y)
    if y.is_floating_point():
        if not torch.isfinite(y).all() or not torch.equal(y, y.round()):
            raise MocoError(f"{what} must be integer class indices, got non-integer values (dtype {y.dtype}); "
                            "pass class indices 0..K-1, not scores or one-hot rows")
    elif y.dtype == torch.bool or y.is_complex():
        raise MocoError(f"{what} must be integer class indices, got dtype {y.dtype}")
    if y.dim() != 1:
        raise MocoError(f"{what} must be one class index per sample (shape [N]), got shape {tuple(y.shape)}")
    y = y.long()
    if y.numel():
        low, high = int(y.min()), int(y.max())
        if low < 0 or (num_classes is not None and high >= num_classes):
            bound = f"0..{num_classes - 1} (the model has {num_classes} outputs)" if num_classes else ">= 0"
            raise MocoError(f"{what} lie in {low}..{high}, but class indices must be in {bound}; "
                            "the data does not fit the model")
    return y


def num_samples(data: Any) -> int:
    """Number of samples in ``data`` (raises TypeError for an iterable of unknown length)."""
    pair = as_tensors(data)
    if pair is not None:
        return len(pair[0])
    if isinstance(data, DataLoader):
        return len(data.dataset)  # type: ignore[arg-type]
    if isinstance(data, Dataset):
        return len(data)  # type: ignore[arg-type]
    raise TypeError(f"cannot count samples of {type(data).__name__}; pass a tensor, (x, y), Dataset or DataLoader")


def iter_batches(
    data: Any,
    batch_size: int = 256,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield ``(x, y)`` batches (``y`` is None when the data has no labels).

    In-memory data is sliced directly (fast, no per-sample Python calls); a Dataset is wrapped in a
    DataLoader; a DataLoader is iterated as it is (its own batch size wins).
    """
    if batch_size < 1:
        raise MocoError(f"batch_size must be >= 1, got {batch_size}")
    pair = as_tensors(data)
    if pair is not None:
        x, y = pair
        n = len(x)
        order = torch.randperm(n, generator=generator) if shuffle else None
        for start in range(0, n, batch_size):
            if order is None:
                idx = slice(start, start + batch_size)
            else:
                idx = order[start : start + batch_size]
            yield x[idx], (y[idx] if y is not None else None)
        return
    if isinstance(data, DataLoader):
        loader = data
    elif isinstance(data, Dataset):
        loader = DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator)
    else:
        raise TypeError(
            f"data must be a tensor, an (x, y) pair of tensors, a Dataset or a DataLoader, not {type(data).__name__}"
        )
    for batch in loader:
        if isinstance(batch, torch.Tensor):
            yield batch, None
        elif isinstance(batch, (tuple, list)) and len(batch) >= 1:
            yield batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            raise TypeError(f"a batch from the DataLoader is {type(batch).__name__}; expected a tensor or (x, y)")
