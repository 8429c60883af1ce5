"""When moco draws a progress bar.

``progress=True`` (the library default) draws tqdm bars where a person watches them: on a terminal, or
in a Jupyter notebook (tqdm.auto's widgets). Written into a file or a pipe (a CI log, ``2>&1 | tee``) their
``\\r`` redraws would interleave with printed lines, so there they are off, as in the ``moco`` command
(whose ``--no-progress`` turns them off on a terminal too).
"""

from __future__ import annotations

import sys

__all__ = ["show_progress"]


def show_progress(progress: object) -> bool:
    """True when ``progress`` is set and stderr is a terminal or a notebook's output."""
    if not progress:
        return False
    if "ipykernel" in sys.modules:  # a notebook: its stderr is no tty, but tqdm.auto renders a widget
        return True
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())
