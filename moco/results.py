"""One result protocol for every moco result: ``to_text()``, ``to_dict()``, ``to_frame()``, ``str()``.

* ``to_dict()`` is JSON-safe (plain numbers, strings, lists, dicts; NaN/inf become None);
* ``to_text()`` is what a person reads; ``str(result)`` is the same;
* ``to_frame()`` is a pandas DataFrame for tabular results (one row per step, layer, class, ...).

:func:`frame_text` prints a DataFrame with every column and row (pandas truncates wide tables
otherwise), which every moco table uses.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["ResultProtocol", "frame_text", "json_safe"]


def json_safe(obj: Any) -> Any:
    """``obj`` with numpy/torch scalars and arrays turned into Python values, tuples into lists,
    non-finite floats into None and dict keys into strings."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return json_safe(obj.tolist())
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return json_safe(obj.to_dict())
    return str(obj)


def frame_text(frame, *, float_format: str = "{:.4g}") -> str:
    """A DataFrame as text with every row and column shown (no ``...``)."""
    if frame is None or len(frame.columns) == 0:
        return "(empty table)"
    frame = frame.copy()
    for column in frame.columns[frame.dtypes == object]:  # a missing value reads "n/a", not None or NaN
        frame[column] = frame[column].map(lambda v: "n/a" if v is None or (isinstance(v, float) and v != v) else v)
    return frame.to_string(index=False, max_rows=None, max_cols=None, line_width=None, na_rep="n/a",
                           float_format=lambda v: float_format.format(v))


class ResultProtocol:
    """Mixin for a class that defines ``to_dict()``: ``__str__`` is ``to_text()``; ``to_text()`` and
    ``to_frame()`` default to ``to_dict()``'s scalars (one line each / one row)."""

    def to_text(self) -> str:
        rows = {k: v for k, v in self.to_dict().items() if not isinstance(v, (dict, list))}
        width = max((len(k) for k in rows), default=0)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows.items())

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([{k: v for k, v in self.to_dict().items() if not isinstance(v, (dict, list))}])

    def __str__(self) -> str:
        return self.to_text()
