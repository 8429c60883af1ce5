"""``ImageDataset``: a labelled image classification set held in memory as uint8 tensors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from moco.errors import MocoError

__all__ = ["ImageDataset"]


@dataclass(frozen=True, eq=False, repr=False)
class ImageDataset(Dataset):
    """Images and labels in memory, one class for every moco loader.

    Fields:

    * ``images``: uint8 tensor (N, C, H, W), pixel values 0..255;
    * ``targets``: int64 tensor (N,), class indices 0..num_classes-1;
    * ``classes``: class names, index = label;
    * ``name``: dataset name (``"mnist"``, ``"fashion_mnist"``, ``"cifar10"``, ``"digits"``);
    * ``source``: the folder the data was read from, or ``"sklearn digits (embedded)"``;
    * ``mean``/``std``: per-channel normalisation constants for pixels scaled to [0, 1];
    * ``normalize``: whether samples are standardised with ``mean``/``std`` (default True).

    ``ds[i]`` is ``(x, label)``: ``x`` a float32 tensor (C, H, W), pixels / 255, then ``(x - mean) / std`` per
    channel when ``normalize``; ``label`` an int. The instance is frozen: use :meth:`subset` or
    ``dataclasses.replace(ds, normalize=False)`` to get a variant.
    """

    images: torch.Tensor
    targets: torch.Tensor
    classes: tuple[str, ...]
    name: str
    source: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    normalize: bool = True
    _mean_t: torch.Tensor = field(init=False, repr=False)
    _std_t: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        images, targets = self.images, self.targets
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise MocoError(f"images must be a uint8 tensor (N, C, H, W), got "
                            f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}")
        if not isinstance(targets, torch.Tensor) or targets.dtype != torch.int64 or targets.dim() != 1:
            raise MocoError(f"targets must be an int64 tensor (N,), got "
                            f"{getattr(targets, 'dtype', type(targets).__name__)} {tuple(getattr(targets, 'shape', ()))}")
        if len(images) != len(targets):
            raise MocoError(f"{len(images)} images but {len(targets)} targets; they must match")
        classes = tuple(str(c) for c in self.classes)
        if not classes:
            raise MocoError("classes must name at least one class")
        if len(targets) and (int(targets.min()) < 0 or int(targets.max()) >= len(classes)):
            raise MocoError(f"targets must lie in 0..{len(classes) - 1}, got {int(targets.min())}..{int(targets.max())}")
        channels = images.shape[1]
        mean = tuple(float(m) for m in self.mean)
        std = tuple(float(s) for s in self.std)
        if len(mean) != channels or len(std) != channels:
            raise MocoError(f"mean and std need one value per channel ({channels}), got {len(mean)} and {len(std)}")
        if any(not s > 0 for s in std):
            raise MocoError(f"std values must be > 0, got {std}")
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "normalize", bool(self.normalize))
        object.__setattr__(self, "_mean_t", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1))
        object.__setattr__(self, "_std_t", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))

    def __len__(self) -> int:
        """Number of samples N."""
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Sample ``index``: (float32 tensor (C, H, W), int label); see the class docstring for the scaling."""
        x = self.images[index].to(torch.float32).div_(255.0)
        if self.normalize:
            x.sub_(self._mean_t).div_(self._std_t)
        return x, int(self.targets[index])

    def __repr__(self) -> str:
        return (f"ImageDataset(name={self.name!r}, n={len(self)}, shape={self.input_shape}, "
                f"classes={self.num_classes}, normalize={self.normalize}, source={self.source!r})")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one sample, (C, H, W)."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(classes)``)."""
        return len(self.classes)

    def tensors(self, normalize: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole set at once: (x float32 (N, C, H, W), y int64 (N,)), new tensors.

        ``x`` is scaled like ``ds[i]``; ``normalize`` overrides the dataset's own setting when not None.
        """
        x = self.images.to(torch.float32).div_(255.0)
        if self.normalize if normalize is None else normalize:
            x.sub_(self._mean_t).div_(self._std_t)
        return x, self.targets.clone()

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> "ImageDataset":
        """A new ImageDataset holding rows ``indices`` (ints, or a boolean mask of length N), in that order."""
        index = torch.as_tensor(np.asarray(indices) if not isinstance(indices, torch.Tensor) else indices)
        if index.dtype == torch.bool:
            if index.shape != (len(self),):
                raise MocoError(f"a boolean mask must have shape ({len(self)},), got {tuple(index.shape)}")
            index = index.nonzero().flatten()
        if index.numel() == 0:
            index = index.reshape(0).to(torch.int64)
        if index.dim() != 1 or index.is_floating_point() or index.is_complex():
            raise MocoError(f"indices must be a 1-D sequence of ints, got {index.dtype} {tuple(index.shape)}")
        index = index.to(torch.int64)
        if index.numel() and (int(index.min()) < -len(self) or int(index.max()) >= len(self)):
            raise MocoError(f"indices must lie in -{len(self)}..{len(self) - 1}, "
                            f"got {int(index.min())}..{int(index.max())}")
        return dataclasses.replace(self, images=self.images[index], targets=self.targets[index])

    def __getstate__(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            object.__setattr__(self, key, value)
        self.__post_init__()
