"""scikit-learn's bundled 8x8 handwritten digits (1797 images, works offline), upsampled for 28x28 models."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from moco.data.dataset import ImageDataset
from moco.data.split import split_indices
from moco.errors import MocoError

__all__ = ["DIGITS_SOURCE", "DIGITS_SPLIT_SEED", "DIGITS_TEST_FRACTION", "load_digits"]

DIGITS_SOURCE = "sklearn digits (embedded)"
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def load_digits(*, normalize: bool = True, size: int = 28, train: bool | None = None) -> ImageDataset:
    """scikit-learn's digits as an ImageDataset named ``"digits"``: 1 channel, ``size`` x ``size``, labels 0..9.

    The 8x8 images (values 0..16) are upsampled bilinearly (``torch.nn.functional.interpolate``,
    ``align_corners=False``) to ``size`` x ``size`` and scaled 0..16 -> 0..255 as uint8.

    ``train``: None -> all 1797 images; True / False -> the train (80 %, 1438 images) or test (20 %, 359 images)
    part of a fixed split: :func:`moco.data.split.split_indices` with ``val_fraction=0.2`` and seed 0 (stratified,
    disjoint, the same on every call). ``mean``/``std`` are computed from the train part, whatever ``train`` is.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise MocoError(f"size must be a positive int (pixels per side), got {size!r}")
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    pixels = torch.as_tensor(np.asarray(bunch.images, dtype=np.float32)).unsqueeze(1)  # (N, 1, 8, 8), 0..16
    if size != pixels.shape[-1]:
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    images = pixels.mul_(255.0 / 16.0).round_().clamp_(0, 255).to(torch.uint8)
    targets = torch.as_tensor(np.asarray(bunch.target, dtype=np.int64))
    train_rows, test_rows, _ = split_indices(targets.numpy(), val_fraction=DIGITS_TEST_FRACTION,
                                             seed=DIGITS_SPLIT_SEED)
    scaled = images[torch.as_tensor(train_rows)].to(torch.float64).div_(255.0)
    mean, std = (float(scaled.mean()),), (float(scaled.std()),)
    dataset = ImageDataset(images=images, targets=targets, classes=tuple(str(d) for d in range(10)),
                           name="digits", source=DIGITS_SOURCE, mean=mean, std=std, normalize=normalize)
    if train is None:
        return dataset
    return dataset.subset(train_rows if train else test_rows)
