"""CIFAR-10 binary batches: parse and write.

Each record is 1 label byte (0..9) then 3072 pixel bytes: the 32x32 red plane, green plane, then blue plane, each
row-major, so ``record[1:].reshape(3, 32, 32)`` is the image in CHW order. Records follow each other with nothing
between them.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from moco.data.catalog import CIFAR10_RECORD_BYTES
from moco.data.payload import corrupt, read_payload
from moco.io import atomic_path

__all__ = ["encode_cifar_batch", "parse_cifar_batch", "read_cifar_batch", "write_cifar_batch"]


def parse_cifar_batch(data: bytes, path: str | Path, *, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Parse uncompressed batch bytes into (images uint8 (N, 3, 32, 32), labels int64 (N,)).

    Raises DataCorruptError naming ``path`` when the file is empty, not a whole number of records (truncated or
    extra bytes), or holds a label outside 0..num_classes-1.
    """
    if len(data) == 0:
        raise corrupt(path, "file is empty")
    if len(data) % CIFAR10_RECORD_BYTES:
        whole = len(data) // CIFAR10_RECORD_BYTES
        raise corrupt(path, f"size {len(data)} bytes is not a whole number of {CIFAR10_RECORD_BYTES}-byte records "
                            f"({whole} records + {len(data) - whole * CIFAR10_RECORD_BYTES} bytes: truncated "
                            f"or extra trailing bytes)")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, CIFAR10_RECORD_BYTES)
    labels = records[:, 0]
    if int(labels.max()) >= num_classes:
        bad = int(np.argmax(labels >= num_classes))
        raise corrupt(path, f"label {int(labels[bad])} in record {bad} is out of range 0..{num_classes - 1}")
    images = np.ascontiguousarray(records[:, 1:]).reshape(-1, 3, 32, 32)
    return images, labels.astype(np.int64)


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one batch file (``.bin`` or ``.bin.gz``): (images uint8 (N, 3, 32, 32), labels int64 (N,))."""
    return parse_cifar_batch(read_payload(path), path)


def encode_cifar_batch(images: np.ndarray, labels: np.ndarray) -> bytes:
    """The bytes of a batch file holding ``images`` (uint8 (N, 3, 32, 32)) and ``labels`` (N values 0..255)."""
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (3, 32, 32):
        raise ValueError(f"images must be uint8 (N, 3, 32, 32), got {images.dtype} {images.shape}")
    if labels.shape != (len(images),):
        raise ValueError(f"labels must have shape ({len(images)},), got {labels.shape}")
    records = np.empty((len(images), CIFAR10_RECORD_BYTES), dtype=np.uint8)
    records[:, 0] = labels.astype(np.uint8)
    records[:, 1:] = images.reshape(len(images), -1)
    return records.tobytes()


def write_cifar_batch(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray) -> Path:
    """Write a batch file atomically (gzip-compressed when ``path`` ends in ``.gz``); returns the path."""
    data = encode_cifar_batch(images, labels)
    path = Path(path)
    if path.suffix == ".gz":
        data = gzip.compress(data, compresslevel=6, mtime=0)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path
