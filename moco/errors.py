"""Exceptions moco raises for bad input.

Every error a user can cause derives from ``ValueError`` or ``TypeError`` so that library callers can
catch it the usual way; the CLI turns them into exit code 2 and one line on stderr.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "DataCorruptError", "DataNotFoundError", "MocoError", "input_error"]


class MocoError(ValueError):
    """Bad input to moco: the message names the problem and the fix."""


class DataNotFoundError(FileNotFoundError, MocoError):
    """A dataset file is missing (and could not be downloaded).

    It is both a ``FileNotFoundError`` (what it is) and a ``ValueError`` (what moco promises).
    """


class DataCorruptError(MocoError):
    """A dataset file exists but its content is not what its format promises."""


class CheckpointError(MocoError):
    """A checkpoint file cannot be read as a moco checkpoint."""


def input_error(exc: BaseException, shape: tuple[int, ...] | None, doing: str = "run") -> MocoError:
    """The one-line error for a model that fails on its first batch (PyTorch's own last line kept): almost
    always inputs of a shape or dtype the model does not take. Raise it ``from None``."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    last = f"{type(exc).__name__}: {lines[-1]}" if lines else type(exc).__name__
    where = f"inputs of shape {tuple(shape)}" if shape is not None else "its first batch"
    return MocoError(f"the model could not {doing} on {where}: {last}; pass inputs of the shape and dtype the "
                     "model takes (as in training)")
