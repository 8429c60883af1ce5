"""Load a dataset by name into an ImageDataset: MNIST, Fashion-MNIST, CIFAR-10 (files) and digits (embedded)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from moco.data.catalog import CIFAR10, DATASETS, FASHION_MNIST, MNIST, DatasetSpec
from moco.data.cifar import read_cifar_batch
from moco.data.dataset import ImageDataset
from moco.data.digits import load_digits
from moco.data.download import download_dataset
from moco.data.idx import read_idx_images, read_idx_labels
from moco.data.payload import FIX, corrupt
from moco.data.root import download_root, find_split, missing_error, search_roots
from moco.errors import DataCorruptError, DataNotFoundError, MocoError

__all__ = [
    "DATASET_NAMES", "available_datasets", "canonical_name", "load_cifar10", "load_dataset",
    "load_fashion_mnist", "load_mnist",
]

Root = str | os.PathLike | None


def _split_paths(spec: DatasetSpec, root: Root, train: bool, download: bool) -> list[Path]:
    """Paths of one split's files (in catalog order), downloading the dataset first when asked and needed."""
    roots = search_roots(root)
    found = find_split(spec, roots, train)
    if found is None and download:
        dest = download_root(root)
        try:
            download_dataset(spec, dest)
        except DataNotFoundError as exc:
            raise missing_error(spec, roots, train, download_error=str(exc)) from exc
        found = find_split(spec, (dest,), train)
    if found is None:
        raise missing_error(spec, roots, train)
    return [found[f.name] for f in spec.split_files(train)]


def _load_idx_dataset(spec: DatasetSpec, root: Root, train: bool, normalize: bool, download: bool) -> ImageDataset:
    images_path, labels_path = _split_paths(spec, root, train, download)
    images = read_idx_images(images_path)
    labels = read_idx_labels(labels_path, num_classes=len(spec.classes))
    if images.shape[1:] != spec.image_shape[1:]:
        raise corrupt(images_path, f"images are {images.shape[1]}x{images.shape[2]}, "
                                   f"{spec.name} images are {spec.image_shape[1]}x{spec.image_shape[2]}")
    if len(images) != len(labels):
        raise DataCorruptError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} "
                               f"labels (count mismatch); {FIX}")
    return ImageDataset(images=torch.from_numpy(images).unsqueeze(1), targets=torch.from_numpy(labels),
                        classes=spec.classes, name=spec.name, source=str(images_path.parent),
                        mean=spec.mean, std=spec.std, normalize=normalize)


def load_mnist(root: Root = None, *, train: bool = True, normalize: bool = True,
               download: bool = False) -> ImageDataset:
    """MNIST handwritten digits: 60000 train / 10000 test images, uint8 1x28x28, labels 0..9.

    Files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` are searched under ``<root>/mnist/`` then
    ``<root>/MNIST/raw/``; see :func:`moco.data.resolve_root` for the root. Normalisation: mean 0.1307, std 0.3081.
    Raises DataNotFoundError (missing, ``download=False`` or download failed) or DataCorruptError (bad file).
    """
    return _load_idx_dataset(MNIST, root, train, normalize, download)


def load_fashion_mnist(root: Root = None, *, train: bool = True, normalize: bool = True,
                       download: bool = False) -> ImageDataset:
    """Fashion-MNIST (Zalando): 60000 train / 10000 test images, uint8 1x28x28, 10 clothing classes.

    Same file names as MNIST, under ``<root>/fashion-mnist/`` then ``<root>/FashionMNIST/raw/``.
    Normalisation: mean 0.2860, std 0.3530. Errors as :func:`load_mnist`.
    """
    return _load_idx_dataset(FASHION_MNIST, root, train, normalize, download)


def load_cifar10(root: Root = None, *, train: bool = True, normalize: bool = True,
                 download: bool = False) -> ImageDataset:
    """CIFAR-10 (binary version): 50000 train / 10000 test images, uint8 3x32x32 (RGB), 10 classes.

    Train is ``data_batch_1..5`` concatenated in order, test is ``test_batch``; each ``.bin`` or ``.bin.gz``, under
    ``<root>/cifar-10/`` then ``<root>/cifar-10-batches-bin/``. Normalisation: mean (0.4914, 0.4822, 0.4465),
    std (0.2470, 0.2435, 0.2616). Errors as :func:`load_mnist`.
    """
    paths = _split_paths(CIFAR10, root, train, download)
    with ThreadPoolExecutor(max_workers=max(1, min(len(paths), os.cpu_count() or 1))) as pool:
        batches = list(pool.map(read_cifar_batch, paths))
    images = np.concatenate([b[0] for b in batches]) if len(batches) > 1 else batches[0][0]
    labels = np.concatenate([b[1] for b in batches]) if len(batches) > 1 else batches[0][1]
    return ImageDataset(images=torch.from_numpy(images), targets=torch.from_numpy(labels),
                        classes=CIFAR10.classes, name=CIFAR10.name, source=str(paths[0].parent),
                        mean=CIFAR10.mean, std=CIFAR10.std, normalize=normalize)


DATASET_NAMES = ("mnist", "fashion_mnist", "cifar10", "digits")
_ALIASES = {"fashion-mnist": "fashion_mnist", "fashionmnist": "fashion_mnist", "cifar-10": "cifar10",
            "cifar_10": "cifar10"}


def canonical_name(name: str) -> str:
    """The canonical dataset name for ``name`` (case-insensitive; accepts "fashion-mnist", "cifar-10").

    Raises MocoError listing the choices for an unknown name.
    """
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASET_NAMES:
        raise MocoError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    return key


def load_dataset(name: str, root: Root = None, *, train: bool = True, normalize: bool = True,
                 download: bool = False) -> ImageDataset:
    """Load dataset ``name`` ("mnist", "fashion_mnist", "cifar10" or "digits"; aliases "fashion-mnist", "cifar-10").

    For "digits" (embedded in scikit-learn, 28x28) ``root`` and ``download`` are ignored and ``train`` picks the
    fixed, seeded 80/20 split described in :func:`moco.data.load_digits`. Unknown names raise MocoError.
    """
    key = canonical_name(name)
    if key == "digits":
        return load_digits(normalize=normalize, train=train)
    loader = {"mnist": load_mnist, "fashion_mnist": load_fashion_mnist, "cifar10": load_cifar10}[key]
    return loader(root, train=train, normalize=normalize, download=download)


def available_datasets(root: Root = None) -> list[str]:
    """Names of the file datasets (of mnist, fashion_mnist, cifar10) whose train and test files are all present.

    Searches the same folders as the loaders (:func:`moco.data.root.search_roots`); files are not opened.
    """
    roots = search_roots(root)
    return [name for name, spec in DATASETS.items()
            if find_split(spec, roots, True) is not None and find_split(spec, roots, False) is not None]
