"""The one exception of :mod:`moco.compress.surgery`."""

from __future__ import annotations

from moco.errors import MocoError

__all__ = ["SurgeryError"]


class SurgeryError(MocoError):
    """A model or a ``keep`` request that surgery cannot handle; the message names the op or layer and the fix."""
