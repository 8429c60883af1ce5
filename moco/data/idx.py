"""IDX files (the MNIST / Fashion-MNIST format): parse and write.

Layout: a big-endian uint32 magic number ``0x000008dd`` (``08`` = unsigned bytes, ``dd`` = number of dimensions),
then one big-endian uint32 per dimension, then the values row-major. Images use magic 2051 (3 dimensions:
N, rows, cols); labels use magic 2049 (1 dimension: N).
"""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import numpy as np

from moco.data.payload import corrupt, read_payload
from moco.io import atomic_path

__all__ = [
    "IMAGES_MAGIC", "LABELS_MAGIC", "encode_idx", "parse_idx", "read_idx_images", "read_idx_labels",
    "write_idx",
]

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049


def parse_idx(data: bytes, path: str | Path, *, magic: int) -> np.ndarray:
    """Parse uncompressed IDX bytes into a uint8 array (a read-only view of ``data``).

    ``magic`` is the expected magic number (2051 images -> shape (N, rows, cols); 2049 labels -> shape (N,)).
    Raises DataCorruptError naming ``path`` for a wrong magic number, a short header, a payload shorter than the
    header promises (truncated) or longer (extra trailing bytes).
    """
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < 4:
        raise corrupt(path, f"file is {len(data)} bytes, too short for an IDX header (truncated)")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise corrupt(path, f"wrong magic number {found} (expected {magic}); not an IDX "
                            f"{'images' if magic == IMAGES_MAGIC else 'labels'} file")
    if len(data) < header:
        raise corrupt(path, f"file is {len(data)} bytes, shorter than its {header}-byte header (truncated)")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + math.prod(dims)
    if len(data) < expected:
        raise corrupt(path, f"truncated: header promises {dims} = {expected} bytes, file has {len(data)}")
    if len(data) > expected:
        raise corrupt(path, f"{len(data) - expected} extra trailing bytes after the {expected} bytes "
                            f"the header promises for shape {dims}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_idx_images(path: str | Path) -> np.ndarray:
    """Images of an IDX file (``.gz`` or plain) as a writable uint8 array of shape (N, rows, cols)."""
    array = parse_idx(read_payload(path), path, magic=IMAGES_MAGIC)
    if array.shape[1] == 0 or array.shape[2] == 0:
        raise corrupt(path, f"image size {array.shape[1]}x{array.shape[2]} is empty")
    return array.copy()


def read_idx_labels(path: str | Path, *, num_classes: int = 10) -> np.ndarray:
    """Labels of an IDX file (``.gz`` or plain) as an int64 array of shape (N,), each in 0..num_classes-1."""
    array = parse_idx(read_payload(path), path, magic=LABELS_MAGIC)
    if array.size and int(array.max()) >= num_classes:
        bad = int(np.argmax(array >= num_classes))
        raise corrupt(path, f"label {int(array[bad])} at index {bad} is out of range 0..{num_classes - 1}")
    return array.astype(np.int64)


def encode_idx(array: np.ndarray) -> bytes:
    """The uncompressed IDX bytes of a uint8 array with 1 dimension (labels) or 3 (images N x rows x cols)."""
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim not in (1, 3):
        raise ValueError(f"encode_idx needs a uint8 array with 1 or 3 dimensions, got {array.dtype} {array.shape}")
    magic = LABELS_MAGIC if array.ndim == 1 else IMAGES_MAGIC
    header = np.array((magic, *array.shape), dtype=">u4").tobytes()
    return header + np.ascontiguousarray(array).tobytes()


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file (gzip-compressed when ``path`` ends in ``.gz``), atomically; returns the path."""
    data = encode_idx(array)
    path = Path(path)
    if path.suffix == ".gz":
        data = gzip.compress(data, compresslevel=6, mtime=0)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path
