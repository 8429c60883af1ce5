"""Download dataset files from their canonical addresses, verified by MD5, written atomically.

Nothing is written until the bytes match the known MD5, and every file is written through
:func:`moco.io.atomic_path`, so a failed or interrupted download never leaves a partial file behind.
Tests replace :func:`_fetch` (the only function touching the network).
"""

from __future__ import annotations

import hashlib
import http.client
import io
import logging
import os
import tarfile
import urllib.request
import zlib
from pathlib import Path

import moco
from moco.data.catalog import (CIFAR10, CIFAR10_ARCHIVE_FOLDER, CIFAR10_ARCHIVE_MD5, CIFAR10_ARCHIVE_URL,
                               DatasetSpec, FileSpec)
from moco.data.root import dataset_folders, download_root, locate_file
from moco.errors import DataCorruptError, DataNotFoundError
from moco.io import write_bytes_atomic

__all__ = ["DOWNLOAD_TIMEOUT_S", "download_dataset", "fetch_verified", "md5_hex"]

DOWNLOAD_TIMEOUT_S = 60.0
"""Socket timeout for one download, in seconds (per network operation, not for the whole transfer)."""

log = logging.getLogger(__name__)


def _fetch(url: str, timeout: float) -> bytes:
    """All bytes at ``url`` (HTTP GET with a ``timeout`` in seconds); raises OSError/URLError on failure."""
    request = urllib.request.Request(url, headers={"User-Agent": f"moco/{moco.__version__}"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def md5_hex(data: bytes) -> str:
    """MD5 of ``data`` as 32 lowercase hex digits."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def fetch_verified(urls: tuple[str, ...], md5: str, what: str) -> bytes:
    """The bytes of ``what`` from the first of ``urls`` that answers with content whose MD5 is ``md5``.

    Raises DataCorruptError when some mirror answered but none with the right MD5, DataNotFoundError when none
    answered (no network, HTTP error, timeout). Nothing is written either way.
    """
    failures: list[str] = []
    mismatches: list[str] = []
    for url in urls:
        log.info("downloading %s", url)
        try:
            data = _fetch(url, DOWNLOAD_TIMEOUT_S)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            failures.append(f"{url}: {type(exc).__name__}: {exc}")
            continue
        digest = md5_hex(data)
        if digest == md5:
            return data
        mismatches.append(f"{url} gave {len(data)} bytes with md5 {digest}, expected {md5}")
    if mismatches:
        raise DataCorruptError(f"download of {what} failed its checksum ({'; '.join(mismatches + failures)}); "
                               f"nothing was written. Retry later, or point MOCO_DATA at a good copy.")
    raise DataNotFoundError(f"could not download {what} ({'; '.join(failures)}).")


def _download_idx(spec: DatasetSpec, folder: Path, files: list[FileSpec]) -> None:
    for file in files:
        name = file.name + ".gz"
        if file.gz_md5 is None:
            raise DataCorruptError(f"no known md5 for {name}; cannot verify a download")
        data = fetch_verified(tuple(mirror + name for mirror in spec.mirrors), file.gz_md5, name)
        write_bytes_atomic(folder / name, data)


def _download_cifar10(folder: Path, files: list[FileSpec]) -> None:
    archive_name = CIFAR10_ARCHIVE_URL.rsplit("/", 1)[-1]
    archive = fetch_verified((CIFAR10_ARCHIVE_URL,), CIFAR10_ARCHIVE_MD5, archive_name)
    contents: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            for file in files:
                member = tar.extractfile(f"{CIFAR10_ARCHIVE_FOLDER}/{file.name}")
                if member is None:
                    raise KeyError(file.name)
                contents[file.name] = member.read()
    except (tarfile.TarError, KeyError, EOFError, zlib.error, OSError) as exc:
        raise DataCorruptError(f"{archive_name} passed its md5 but could not be unpacked "
                               f"({type(exc).__name__}: {exc}); nothing was written") from exc
    for file in files:
        digest = md5_hex(contents[file.name])
        if file.raw_md5 is not None and digest != file.raw_md5:
            raise DataCorruptError(f"{file.name} from {archive_name} has md5 {digest}, expected {file.raw_md5}; "
                                   f"nothing was written")
    for file in files:
        write_bytes_atomic(folder / file.name, contents[file.name])


def download_dataset(spec: DatasetSpec, root: str | os.PathLike | None = None) -> Path:
    """Download the files of dataset ``spec`` missing under the download root; returns the dataset folder.

    The download root is ``root`` if given, else ``$MOCO_DATA``, else ``cache_dir() / "data"``; files go to its
    moco-layout folder (``mnist/``, ``fashion-mnist/``, ``cifar-10/``). MNIST / Fashion-MNIST files are stored as
    the published ``.gz`` files; CIFAR-10 batches are extracted from the official archive as plain ``.bin`` files.
    Raises DataNotFoundError when the network fails, DataCorruptError when a checksum fails; in both cases no
    file is written (files completed earlier in the same call are kept: each is verified and whole).
    """
    dest = download_root(root)
    folder = dataset_folders(dest, spec)[0]
    missing = [f for f in spec.files if locate_file(dest, spec, f) is None]
    if not missing:
        return folder
    if spec.name == CIFAR10.name:
        _download_cifar10(folder, missing)
    else:
        _download_idx(spec, folder, [f for f in missing if f.required])
    return folder
