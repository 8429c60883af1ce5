"""Check a data root: which dataset files are present, and whether their MD5s match the published ones."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from moco.data.catalog import DATASETS, DatasetSpec, FileSpec
from moco.data.download import md5_hex
from moco.data.payload import GZIP_MAGIC, decompress
from moco.data.root import locate_file, resolve_root
from moco.errors import DataCorruptError

__all__ = ["DataCheck", "DatasetCheck", "check_root", "file_md5_ok"]


def file_md5_ok(path: Path, file: FileSpec) -> bool:
    """Whether ``path`` holds ``file``'s published content.

    A ``.gz`` file passes when its own MD5 is the published ``.gz`` MD5; otherwise (any file) when the MD5 of its
    uncompressed content is the known content MD5 (for CIFAR-10, the published MD5 of the original ``.bin``).
    A file that does not gunzip fails.
    """
    data = path.read_bytes()
    compressed = path.suffix == ".gz" or data[:2] == GZIP_MAGIC
    if compressed and file.gz_md5 is not None and md5_hex(data) == file.gz_md5:
        return True
    if file.raw_md5 is None:
        return False
    if compressed:
        try:
            data = decompress(data, path)
        except DataCorruptError:
            return False
    return md5_hex(data) == file.raw_md5


@dataclass(frozen=True)
class DatasetCheck:
    """One dataset's row: ``found`` paths, ``missing`` required file names, ``mismatched`` paths (bad MD5).

    ``verified`` says whether MD5s were checked. Optional files (CIFAR-10's ``batches.meta.txt``) are listed in
    ``found`` and checked when present, never ``missing``.
    """

    name: str
    found: tuple[Path, ...]
    missing: tuple[str, ...]
    verified: bool
    mismatched: tuple[Path, ...]

    @property
    def present(self) -> bool:
        """All required files were found."""
        return not self.missing

    @property
    def md5_ok(self) -> bool | None:
        """True when every found file matched its MD5, False when one did not, None when not verified."""
        return None if not self.verified else not self.mismatched

    @property
    def ok(self) -> bool:
        """Present and no MD5 mismatch."""
        return self.present and not self.mismatched


@dataclass(frozen=True)
class DataCheck:
    """Result of :func:`check_root`: the ``root`` checked and one :class:`DatasetCheck` per file dataset."""

    root: Path
    datasets: tuple[DatasetCheck, ...]

    @property
    def ok(self) -> bool:
        """Every dataset is present and (when verified) matches its MD5s."""
        return all(row.ok for row in self.datasets)

    def __getitem__(self, name: str) -> DatasetCheck:
        """The row of dataset ``name`` (KeyError when absent)."""
        for row in self.datasets:
            if row.name == name:
                return row
        raise KeyError(name)

    def to_text(self) -> str:
        """A plain-text table: one line per dataset, then a verdict line."""
        header = ("dataset", "present", "files", "md5", "notes")
        lines = []
        for row in self.datasets:
            md5 = {None: "not checked", True: "ok", False: "MISMATCH"}[row.md5_ok] if row.found else "-"
            notes = []
            if row.missing:
                notes.append("missing " + ", ".join(row.missing))
            if row.mismatched:
                notes.append("bad md5 " + ", ".join(str(p) for p in row.mismatched))
            if row.found and not notes:
                notes.append("in " + ", ".join(sorted({str(p.parent) for p in row.found})))
            total = len(row.found) + len(row.missing)
            lines.append((row.name, "yes" if row.present else "no", f"{len(row.found)}/{total}", md5,
                          "; ".join(notes)))
        widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header) - 1)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
        text = [f"data root: {self.root}", fmt.format(*header).rstrip()]
        text += [fmt.format(*line).rstrip() for line in lines]
        text.append("all ok" if self.ok else "PROBLEMS: see the rows above (fix: set MOCO_DATA to a folder with "
                                             "good copies, or load with download=True)")
        return "\n".join(text)


def _check_dataset(root: Path, spec: DatasetSpec, verify_md5: bool, pool: ThreadPoolExecutor) -> DatasetCheck:
    located = [(f, locate_file(root, spec, f)) for f in spec.files]
    found = [(f, p) for f, p in located if p is not None]
    missing = tuple(f.name for f, p in located if p is None and f.required)
    mismatched: tuple[Path, ...] = ()
    if verify_md5:
        results = list(pool.map(lambda fp: file_md5_ok(fp[1], fp[0]), found))
        mismatched = tuple(p for (_, p), good in zip(found, results) if not good)
    return DatasetCheck(spec.name, tuple(p for _, p in found), missing, verify_md5, mismatched)


def check_root(root: str | os.PathLike | None = None, *, verify_md5: bool = True) -> DataCheck:
    """Check the data root (:func:`moco.data.resolve_root`) for mnist, fashion_mnist and cifar10.

    Per dataset: which files are found / missing and, when ``verify_md5``, which found files fail their MD5
    (see :func:`file_md5_ok`; CIFAR-10 batches are checked on their uncompressed content). Files are hashed on
    several threads; the full shared set (~200 MB) takes a few seconds.
    """
    path = resolve_root(root)
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        rows = tuple(_check_dataset(path, spec, verify_md5, pool) for spec in DATASETS.values())
    return DataCheck(path, rows)
