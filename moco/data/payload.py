"""Read a dataset file's content, gunzipping it when it is gzip-compressed, with errors that name the fix."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

from moco.errors import DataCorruptError

__all__ = ["FIX", "GZIP_MAGIC", "corrupt", "decompress", "read_payload"]

GZIP_MAGIC = b"\x1f\x8b"
FIX = "delete it and re-download, or point MOCO_DATA at a good copy"


def corrupt(path: str | Path, problem: str) -> DataCorruptError:
    """A DataCorruptError naming ``path``, the ``problem`` and the fix."""
    return DataCorruptError(f"{path}: {problem}; {FIX}")


def decompress(data: bytes, path: str | Path) -> bytes:
    """Gunzip ``data`` (read from ``path``, named in errors); DataCorruptError when it is not valid gzip."""
    try:
        return gzip.decompress(data)
    except (gzip.BadGzipFile, EOFError, zlib.error, OSError) as exc:
        raise corrupt(path, f"not a valid gzip file ({type(exc).__name__}: {exc})") from exc


def read_payload(path: str | Path) -> bytes:
    """The uncompressed bytes of ``path``.

    A file is gunzipped when its name ends in ``.gz`` or its content starts with the gzip magic bytes.
    """
    path = Path(path)
    data = path.read_bytes()
    if path.suffix == ".gz" or data[:2] == GZIP_MAGIC:
        return decompress(data, path)
    return data
