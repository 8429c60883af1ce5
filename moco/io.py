"""Atomic file writes: a reader never sees a half-written artifact (temp file in the same folder, then rename,
with the usual permissions of a new file, 0666 less the umask); safe reads of JSON and torch files."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_path", "cache_dir", "prepare_out_dir", "read_json_document", "read_torch_file", "write_bytes_atomic",
           "write_json_atomic"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed.

    Use it with writers that want a file name (``torch.save``, ``np.save``, ``fig.savefig``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes 0600; an artifact gets the usual permissions (umask)
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process umask (read by setting and restoring it: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically; returns the path."""
    return write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json_document(path: str | os.PathLike, *, format: str, version: int | None = None, what: str,
                       error: type[Exception] | None = None) -> dict[str, Any]:
    """Read a moco JSON artifact and check its ``format`` tag (and ``version`` when given).

    ``what`` names the artifact in messages (e.g. ``"moco exits file"``). Raises ``error`` (default
    :class:`moco.errors.MocoError`) for a file that is not valid JSON, not a JSON object, or another
    format or version; the message names the file and what was found. The caller checks existence,
    so it can say how to create the file.
    """
    from moco.errors import MocoError

    error = error or MocoError
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({exc}); it is not a {what}") from None
    if not isinstance(doc, dict) or doc.get("format") != format:
        found = doc.get("format") if isinstance(doc, dict) else None
        raise error(f"{path} is not a {what} (format {found!r}, expected {format!r})")
    if version is not None and doc.get("version") != version:
        raise error(f"{path} has {what} version {doc.get('version')}; this moco reads version {version}")
    return doc


def read_torch_file(path: str | os.PathLike, *, what: str, error: type[Exception] | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, with one clear error for every way a file can be bad.

    A file holding Python objects other than tensors and plain values is refused (nothing is
    unpickled: that would run code); a truncated file, random bytes or another format get "truncated or
    not written by torch.save". ``what`` names the file's role in the message (``"weights"``,
    ``"checkpoint"``); ``error`` is the exception class (default :class:`moco.errors.MocoError`).
    """
    import torch

    from moco.errors import MocoError

    error = error or MocoError
    path = Path(path)
    if path.is_dir():
        raise error(f"{what} {path} is a folder; give the file")
    if not path.is_file():
        raise error(f"{what} file {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file; the user needs one message
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        # only a real object in the file names a global; anything else (IndexError, "Unpickler error",
        # torch's "please file an issue") is a file that is not a torch.save archive
        globals_ = [ln for ln in lines if "unsupported global" in ln.lower()]
        if globals_:
            detail = (f"it holds Python objects other than tensors and plain values ({globals_[-1]}), which are "
                      "never unpickled; save model.state_dict()")
        else:
            detail = "it is truncated or was not written by torch.save"
        raise error(f"cannot read {what} {path} safely (weights_only=True): {detail}") from None


def prepare_out_dir(out: Path) -> None:
    """Create the ``--out`` folder ``out`` (parents too) and check it is writable, before any work starts.

    Raises :class:`~moco.errors.MocoError` when ``out`` is a file or cannot be written into.
    """
    from moco.errors import MocoError

    if out.exists() and not out.is_dir():
        raise MocoError(f"--out {out} is a file; give a folder (it is created)")
    out.mkdir(parents=True, exist_ok=True)
    probe = out / ".moco-write-test"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise MocoError(f"cannot write into --out {out}: {exc.strerror}") from None


def cache_dir() -> Path:
    """moco's cache folder: ``$MOCO_CACHE``, else ``$XDG_CACHE_HOME/moco``, else ``~/.cache/moco``."""
    if os.environ.get("MOCO_CACHE"):
        return Path(os.environ["MOCO_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "moco"
