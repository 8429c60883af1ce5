"""Tables and charts of PFA recipes: a pandas DataFrame, or original vs recommended units per layer as bars."""

from __future__ import annotations

import enum
import os
from typing import Any, Mapping, Sequence

from moco.errors import MocoError
from moco.io import atomic_path

__all__ = ["ALL_COLUMNS", "DEFAULT_COLUMNS", "VisType", "recipes_chart", "recipes_table"]

#: Every column :func:`recipes_table` can show, in order.
ALL_COLUMNS = (
    "layer name", "original count", "recommended count", "units to keep", "KL divergence", "PFA strategy",
    "unit selection", "units ratio", "kept energy", "energy threshold",
)
#: The columns shown when ``include_columns`` is None (as in DNIKit).
DEFAULT_COLUMNS = ALL_COLUMNS[:4]


class VisType(str, enum.Enum):
    """How :meth:`PFA.show` presents recipes: a pandas ``TABLE`` or a matplotlib bar ``CHART``."""

    TABLE = "table"
    CHART = "chart"


def _is_recipe_dict(obj: Any) -> bool:
    from moco.compress.pfa.core import PFARecipe

    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, PFARecipe) for v in obj.values())


def normalise(recipes: Any) -> list[tuple[str | None, Mapping]]:
    """``[(label or None, {layer: PFARecipe})]`` from one recipe dict, a tuple/list of them or ``{label: dict}``."""
    if _is_recipe_dict(recipes):
        return [(None, recipes)]
    if isinstance(recipes, Mapping) and recipes and all(_is_recipe_dict(v) for v in recipes.values()):
        return [(str(k), v) for k, v in recipes.items()]
    if isinstance(recipes, (tuple, list)) and recipes and all(_is_recipe_dict(r) for r in recipes):
        labels: list[str] = []
        for r in recipes:
            first = next(iter(r.values())).diagnostics
            base = f"{first.strategy}, {first.unit_strategy}"
            label, i = base, 2
            while label in labels:
                label, i = f"{base} #{i}", i + 1
            labels.append(label)
        return list(zip(labels, recipes))
    raise TypeError(
        "show() takes the dict returned by pfa.get_recipe(), a tuple or list of such dicts, or a dict "
        f"{{label: recipes}}; got {type(recipes).__name__} (empty or with values that are not PFARecipe)"
    )


def _lookup(name: str) -> str:
    lookup = {c.lower(): c for c in ALL_COLUMNS}
    key = str(name).replace("_", " ").lower()
    if key not in lookup:
        raise MocoError(f"unknown column {name!r}; choose from {list(ALL_COLUMNS)} (or [] for all)")
    return lookup[key]


def _columns(include_columns: Sequence[str] | None, exclude_columns: Sequence[str] | None = None) -> list[str]:
    if isinstance(exclude_columns, str):
        raise TypeError("exclude_columns is a list of column names, not a str; e.g. ['units to keep']")
    excluded = {_lookup(c) for c in (exclude_columns or [])}
    cols = [c for c in _included(include_columns) if c not in excluded]
    if not cols:
        raise MocoError("no columns left to show: exclude_columns removes every included column")
    return cols


def _included(include_columns: Sequence[str] | None) -> list[str]:
    if include_columns is None:
        return list(DEFAULT_COLUMNS)
    if isinstance(include_columns, str):
        raise TypeError("include_columns is a list of column names, not a str; e.g. ['layer name', 'recommended count']")
    cols = list(include_columns)
    if not cols:
        return list(ALL_COLUMNS)
    return [_lookup(c) for c in cols]


def _row(recipe) -> dict:
    d = recipe.diagnostics
    return {
        "layer name": recipe.layer_name,
        "original count": recipe.original_count,
        "recommended count": recipe.recommended_count,
        "units to keep": sorted(recipe.units_to_keep),
        "KL divergence": d.kl_divergence,
        "PFA strategy": d.strategy,
        "unit selection": d.unit_strategy,
        "units ratio": d.units_ratio,
        "kept energy": d.kept_energy,
        "energy threshold": d.energy_threshold,
    }


def recipes_table(recipes: Any, *, include_columns: Sequence[str] | None = None,
                  exclude_columns: Sequence[str] | None = None, path: str | os.PathLike | None = None):
    """A pandas DataFrame with one row per layer (per recipe set); a ``recipe`` column when several are given.

    ``include_columns``: None -> :data:`DEFAULT_COLUMNS`; ``[]`` -> all of :data:`ALL_COLUMNS`; names
    may use spaces or underscores. ``exclude_columns``: names to leave out of those. ``path``: also write the table as CSV (atomically).
    """
    import pandas as pd

    groups = normalise(recipes)
    cols = _columns(include_columns, exclude_columns)
    rows = []
    for label, group in groups:
        for recipe in group.values():
            row = {k: v for k, v in _row(recipe).items() if k in cols}
            rows.append({"recipe": label, **row} if len(groups) > 1 else row)
    df = pd.DataFrame(rows, columns=(["recipe"] if len(groups) > 1 else []) + cols)
    if path is not None:
        with atomic_path(path) as tmp:
            df.to_csv(tmp, index=False)
    return df


def recipes_chart(recipes: Any, *, path: str | os.PathLike | None = None, ax: Any = None, title: str | None = None):
    """Bars of original vs recommended units per layer (one bar per recipe set); returns the matplotlib Axes.

    Draws on ``ax`` when given (e.g. ``plt.gca()`` in a notebook), else on a new ``Figure`` (no pyplot
    state). ``path``: save the figure as PNG (atomically).
    """
    import numpy as np

    groups = normalise(recipes)
    layers: list[str] = []
    original: dict[str, int] = {}
    for _, group in groups:
        for recipe in group.values():
            if recipe.layer_name not in original:
                layers.append(recipe.layer_name)
                original[recipe.layer_name] = recipe.original_count
    if ax is None:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(max(6.0, 0.6 * len(layers) * (len(groups) + 1) + 2.0), 4.5))
        ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(layers))
    width = 0.8 / (len(groups) + 1)
    ax.bar(x - 0.4 + width / 2, [original[n] for n in layers], width, label="original", color="0.7")
    for i, (label, group) in enumerate(groups, start=1):
        counts = [group[n].recommended_count if n in group else 0 for n in layers]
        name = label or f"{next(iter(group.values())).diagnostics.strategy} (recommended)"
        ax.bar(x - 0.4 + width * (i + 0.5), counts, width, label=name)
    ax.set_xticks(x)
    ax.set_xticklabels(layers, rotation=45, ha="right")
    ax.set_xlabel("layer name")
    ax.set_ylabel("number of units")
    ax.set_title(title or "PFA: original vs recommended units per layer")
    ax.legend()
    if path is not None:
        fig = ax.figure
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    return ax
