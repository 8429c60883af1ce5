"""Where dataset files live: the data root, and the files of a dataset inside it.

Root resolution order (first match wins):

1. the ``root`` argument, when given;
2. the environment variable ``MOCO_DATA``, when set and non-empty;
3. ``../shared/data`` relative to the current working directory, if that folder exists;
4. ``<repo>/../shared/data`` relative to the installed package (``Path(moco.__file__).parents[2] / "shared" / "data"``),
   if that folder exists;
5. ``cache_dir() / "data"`` (``$MOCO_CACHE/data``, else ``~/.cache/moco/data``), which need not exist yet.

Inside a root each dataset has a folder (``mnist/``, ``fashion-mnist/``, ``cifar-10/``); torchvision's layout
(``MNIST/raw/``, ``FashionMNIST/raw/``, ``cifar-10-batches-bin/``) is accepted as a fallback. A file may be stored
as is or gzip-compressed with a ``.gz`` suffix.
"""

from __future__ import annotations

import os
from pathlib import Path

import moco
from moco.data.catalog import DatasetSpec, FileSpec
from moco.errors import DataNotFoundError
from moco.io import cache_dir

__all__ = [
    "ENV_VAR", "dataset_folders", "default_download_root", "download_root", "find_split", "locate_file",
    "locate_files", "missing_error", "resolve_root", "search_roots",
]

ENV_VAR = "MOCO_DATA"


def _absolute(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(Path(path).expanduser()))


def _env_root() -> Path | None:
    value = os.environ.get(ENV_VAR)
    return _absolute(value) if value else None


def default_download_root() -> Path:
    """The folder downloads go to when no root is given: ``cache_dir() / "data"``."""
    return _absolute(cache_dir() / "data")


def resolve_root(root: str | os.PathLike | None = None) -> Path:
    """The data root folder, as an absolute path (it may not exist).

    Order: ``root`` argument > ``$MOCO_DATA`` > ``./../shared/data`` if it exists > the ``shared/data`` folder beside
    the repository holding the installed package if it exists > ``cache_dir() / "data"``.
    """
    if root is not None:
        return _absolute(root)
    env = _env_root()
    if env is not None:
        return env
    beside_cwd = _absolute(Path.cwd() / ".." / "shared" / "data")
    if beside_cwd.is_dir():
        return beside_cwd
    beside_package = _absolute(Path(moco.__file__).resolve().parents[2] / "shared" / "data")
    if beside_package.is_dir():
        return beside_package
    return default_download_root()


def download_root(root: str | os.PathLike | None = None) -> Path:
    """Where ``download=True`` writes files: ``root`` if given, else ``$MOCO_DATA`` if set, else the cache."""
    if root is not None:
        return _absolute(root)
    return _env_root() or default_download_root()


def search_roots(root: str | os.PathLike | None = None) -> tuple[Path, ...]:
    """Roots a loader searches, in order: the resolved root, then the download root if it differs.

    With an explicit ``root`` or ``$MOCO_DATA`` both are the same folder; with automatic resolution this lets files
    downloaded earlier into the cache be found even when a (partial) ``shared/data`` folder was picked first.
    """
    first, second = resolve_root(root), download_root(root)
    return (first,) if first == second else (first, second)


def dataset_folders(root: Path, spec: DatasetSpec) -> tuple[Path, ...]:
    """The folders under ``root`` searched for ``spec``'s files, moco's layout first."""
    return tuple(root / folder for folder in spec.folders)


def locate_file(root: Path, spec: DatasetSpec, file: FileSpec) -> Path | None:
    """The path of ``file`` under ``root`` (plain name first, then ``.gz``), or None when absent."""
    for folder in dataset_folders(root, spec):
        for name in (file.name, file.name + ".gz"):
            path = folder / name
            if path.is_file():
                return path
    return None


def locate_files(root: Path, spec: DatasetSpec, files: tuple[FileSpec, ...]) -> dict[str, Path | None]:
    """Map each file name in ``files`` to its path under ``root`` (None when missing)."""
    return {f.name: locate_file(root, spec, f) for f in files}


def find_split(spec: DatasetSpec, roots: tuple[Path, ...], train: bool) -> dict[str, Path] | None:
    """Paths of all files of one split from the first root holding all of them, or None when no root does."""
    for root in roots:
        found = locate_files(root, spec, spec.split_files(train))
        if all(path is not None for path in found.values()):
            return {name: path for name, path in found.items() if path is not None}
    return None


def missing_error(spec: DatasetSpec, roots: tuple[Path, ...], train: bool, *,
                  download_error: str | None = None) -> DataNotFoundError:
    """The error for a split whose files are missing: names the files, the folders searched and the fixes.

    ``download_error`` is the reason a download attempt failed, if one was made.
    """
    missing = [
        f.name for f in spec.split_files(train) if all(locate_file(root, spec, f) is None for root in roots)
    ] or [f.name for f in spec.split_files(train)]
    folders = [str(folder) for root in roots for folder in dataset_folders(root, spec)]
    split = "train" if train else "test"
    message = (f"{spec.name} {split} data not found: missing {', '.join(missing)} (plain or .gz) "
               f"in {', '.join(folders)}.")
    if download_error:
        message += (f" Download failed: {download_error} Fix: set {ENV_VAR} to a folder holding "
                    f"{spec.folders[0]}/ (or pass root=), or retry download=True when online.")
    else:
        message += (f" Fix: set {ENV_VAR} to a folder holding {spec.folders[0]}/ (or pass root=), "
                    f"or use download=True.")
    return DataNotFoundError(message)
