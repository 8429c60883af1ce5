"""Datasets for moco: MNIST, Fashion-MNIST, CIFAR-10 (from files) and scikit-learn's digits (embedded).

Every loader returns an :class:`ImageDataset` (uint8 images N x C x H x W in memory, int64 labels); ``ds[i]`` gives
a float32 sample scaled to [0, 1] and, by default, standardised per channel.

Where files are looked for (:func:`resolve_root`): the ``root`` argument, else ``$MOCO_DATA``, else
``../shared/data`` beside the working directory, else ``shared/data`` beside the repository holding moco, else
``cache_dir() / "data"``. ``download=True`` fetches missing files (MD5-checked, written atomically) into ``root``,
``$MOCO_DATA`` or the cache. :func:`check_root` reports presence and checksums (``moco data check``).
"""

from moco.data.check import DataCheck, DatasetCheck, check_root
from moco.data.dataset import ImageDataset
from moco.data.digits import load_digits
from moco.data.download import download_dataset
from moco.data.loaders import (DATASET_NAMES, available_datasets, load_cifar10, load_dataset, load_fashion_mnist,
                               load_mnist)
from moco.data.root import resolve_root
from moco.data.split import split

__all__ = [
    "DATASET_NAMES",
    "DataCheck",
    "DatasetCheck",
    "ImageDataset",
    "available_datasets",
    "check_root",
    "download_dataset",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "resolve_root",
    "split",
]
