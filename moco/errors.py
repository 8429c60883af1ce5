"""Exceptions moco raises for bad input.

Every error a user can cause derives from ``ValueError`` or ``TypeError`` so that library callers can
catch it the usual way; the CLI turns them into exit code 2 and one line on stderr.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "DataCorruptError", "DataNotFoundError", "MocoError"]


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
