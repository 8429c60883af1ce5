"""The :class:`PFA` introspector (DNIKit's API shape): introspect, get recipes, show them."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

from torch import nn

from moco.compress.pfa import selection as _sel
from moco.compress.pfa import strategies as _strat
from moco.compress.pfa.introspect import pooler, stream_model, stream_responses
from moco.compress.pfa.show import VisType, recipes_chart, recipes_table
from moco.compress.pfa.stats import LayerStatistics
from moco.errors import MocoError

__all__ = ["PFA", "PFADiagnostics", "PFARecipe"]


@dataclass(frozen=True)
class PFADiagnostics:
    """How a recipe was derived for one layer.

    Attributes:
        strategy: the recipe, e.g. ``"PFA KL"``, ``"PFA Energy(0.99)"``, ``"PFA Size(0.5)"``.
        unit_strategy: the unit selection, e.g. ``"AbsMax"``.
        kept_energy: fraction (0..1) of the layer's spectral energy in its ``recommended_count``
            largest eigenvalues.
        kl_divergence: KL(normalised spectrum || uniform) in nats (0 = flat spectrum; max ``log n``).
        units_ratio: ``recommended_count / original_count`` (a fraction).
        energy_threshold: the energy fraction targeted (Energy: given; Size: the shared threshold
            found); None for KL.
    """

    strategy: str
    unit_strategy: str
    kept_energy: float
    kl_divergence: float
    units_ratio: float
    energy_threshold: float | None = None

    def to_dict(self) -> dict:
        """Plain dict of the fields."""
        return asdict(self)


@dataclass(frozen=True)
class PFARecipe:
    """PFA's recommendation for one layer.

    Attributes:
        layer_name: the analysed response (a module's qualified name when introspecting a model).
        original_count: units (channels / features) the layer has.
        recommended_count: units the recipe keeps.
        units_to_keep: the indices of the kept units (``len == recommended_count``).
        diagnostics: :class:`PFADiagnostics`.
    """

    layer_name: str
    original_count: int
    recommended_count: int
    units_to_keep: frozenset
    diagnostics: PFADiagnostics

    def keep_indices(self) -> list[int]:
        """``sorted(units_to_keep)``: the form ``moco.compress.surgery.apply(keep=...)`` takes."""
        return sorted(self.units_to_keep)

    def to_dict(self) -> dict:
        """JSON-able dict (units as a sorted list)."""
        return {
            "layer_name": self.layer_name,
            "original_count": self.original_count,
            "recommended_count": self.recommended_count,
            "units_to_keep": self.keep_indices(),
            "diagnostics": self.diagnostics.to_dict(),
        }


class _Strategies:
    """Recipe strategies: ``PFA.Strategy.Energy(energy_threshold, min_kept_count)``, ``.KL()``, ``.Size(relative_size, min_kept_count)``."""

    Energy = _strat.Energy
    KL = _strat.KL
    Size = _strat.Size


class _UnitSelection:
    """Unit selection strategies: ``PFA.UnitSelectionStrategy.AbsMax()``, ``.AbsMin()``, ``.L1Max()``, ``.L1Min()``."""

    AbsMax = _sel.AbsMax
    AbsMin = _sel.AbsMin
    L1Max = _sel.L1Max
    L1Min = _sel.L1Min


_STRATEGY_TYPES = (_strat.Energy, _strat.KL, _strat.Size)
_SELECTION_TYPES = (_sel.AbsMax, _sel.AbsMin, _sel.L1Max, _sel.L1Min)


def _min_samples_reason(count: int, units: int) -> str:
    return (f"only {count} samples for {units} units: PFA needs at least as many samples as units "
            f"(introspect on at least {max(units, 2)} samples)")


@dataclass(frozen=True, eq=False)
class PFA:
    """Principal Filter Analysis of a network's layers (seed 001, DNIKit's ``PFA``).

    Build it with :meth:`introspect`; it holds, per analysed layer, the float64 statistics of the
    layer's pooled responses (:class:`LayerStatistics`: count, mean, covariance, eigenvalues), and in
    ``failed_responses`` the layers that could not be analysed with the reason (fewer samples than
    units, NaN/inf responses, no variance at all). :meth:`get_recipe` turns the spectra into per-layer
    unit counts and unit indices; :meth:`show` tabulates or charts them.

    Attributes:
        statistics: ``{layer: LayerStatistics}`` in layer order (read-only mapping).
        failed_responses: ``{layer: reason}`` (read-only mapping).
    """

    statistics: Mapping[str, LayerStatistics]
    failed_responses: Mapping[str, str]

    Strategy = _Strategies
    UnitSelectionStrategy = _UnitSelection
    VisType = VisType

    def __post_init__(self) -> None:
        object.__setattr__(self, "statistics", MappingProxyType(dict(self.statistics)))
        object.__setattr__(self, "failed_responses", MappingProxyType(dict(self.failed_responses)))

    @property
    def layers(self) -> list[str]:
        """Names of the analysed layers (those with statistics), in order."""
        return list(self.statistics)

    # ------------------------------------------------------------------ introspection
    @classmethod
    def introspect(
        cls,
        source: Any,
        *,
        model: nn.Module | None = None,
        layers: str | Sequence[str] | None = None,
        pooling: str | Callable | None = "max",
        batch_size: int = 500,
        progress: bool = True,
    ) -> "PFA":
        """Stream responses and compute per-layer count, mean, covariance and eigenvalues (float64).

        Args:
            source: with ``model``: the data to run it on (a tensor ``[N, ...]``, an ``(x, y)`` pair,
                a Dataset or a DataLoader). Without ``model``: an iterable of batches
                ``{layer name: [B, units] array}`` (numpy or torch; ``[B, C, H, W]`` is pooled), or
                one such mapping.
            model: the network to analyse; run in eval mode under ``torch.inference_mode()`` (flags
                restored, nothing registered on it).
            layers: qualified module names (``model.named_modules()``) whose outputs to analyse, or
                the response names to keep from ``source``. None: every Conv2d and Linear module but
                the last one (the classifier) / every response in the batches.
            pooling: spatial pooling of ``[B, C, H, W]`` responses to ``[B, C]``: ``"max"`` (as in
                the seed), ``"avg"`` / ``"mean"``, None (responses must be 2-D), or a callable.
            batch_size: samples per forward pass (model and tensor/Dataset data; a DataLoader's own
                batch size wins); pre-computed batches are used as they come.
            progress: show a tqdm bar.

        Returns:
            A :class:`PFA`. Layers with fewer samples than units, NaN/inf responses (those samples are
            counted and the layer is reported) or zero variance go to ``failed_responses``.

        Raises:
            MocoError / TypeError: unknown layer names, a module that does not run or returns a
                non-tensor, NaN inputs, responses that cannot be pooled to ``[B, units]``, a width that
                changes between batches, an empty source.
        """
        pool = pooler(pooling)
        names = [layers] if isinstance(layers, str) else (None if layers is None else list(layers))
        if names is not None and not names:
            raise MocoError("layers is empty; name at least one layer, or pass None for the defaults")
        if model is not None:
            if not isinstance(model, nn.Module):
                raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
            acc, order = stream_model(model, source, names, pool, batch_size, progress)
        else:
            if isinstance(source, nn.Module):
                raise TypeError("source is a model: call PFA.introspect(data, model=model, ...)")
            acc, order = stream_responses(source, names, pool, progress)
        stats: dict[str, LayerStatistics] = {}
        failed: dict[str, str] = {}
        for name in order:
            run = acc.stats[name]
            units = int(run.units or 0)
            bad = acc.nonfinite.get(name, 0)
            if bad:
                failed[name] = f"{bad} samples have NaN or inf responses; check the inputs and the model for overflow"
            elif run.count < max(units, 2):
                failed[name] = _min_samples_reason(run.count, units)
            else:
                st = run.statistics()
                if not st.eigenvalues[0] > 0:
                    failed[name] = (f"all {units} units are constant over the {run.count} samples (zero variance); "
                                    "nothing to analyse")
                else:
                    stats[name] = st
        return cls(stats, failed)

    @classmethod
    def from_statistics(cls, statistics: Mapping[str, LayerStatistics], failed_responses: Mapping[str, str] | None = None) -> "PFA":
        """A PFA over given statistics (e.g. ``LayerStatistics.from_covariance`` of a hand-made matrix)."""
        for name, st in statistics.items():
            if not isinstance(st, LayerStatistics):
                raise TypeError(f"statistics[{name!r}] is a {type(st).__name__}, not a LayerStatistics")
        return cls(dict(statistics), dict(failed_responses or {}))

    # ------------------------------------------------------------------ recipes
    def get_recipe(self, *, strategy: Any = None, unit_strategy: Any = None) -> dict[str, PFARecipe]:
        """Per-layer recipes: how many units to keep (``strategy``) and which (``unit_strategy``).

        Args:
            strategy: ``PFA.Strategy.KL()`` (default), ``.Energy(energy_threshold, min_kept_count)`` or
                ``.Size(relative_size, min_kept_count)``.
            unit_strategy: ``PFA.UnitSelectionStrategy.AbsMax()`` (default), ``.AbsMin()``,
                ``.L1Max()`` or ``.L1Min()``.

        Returns:
            ``{layer: PFARecipe}`` for every analysed layer (failed ones are in ``failed_responses``),
            in layer order.
        """
        strategy = _strat.KL() if strategy is None else strategy
        unit_strategy = _sel.AbsMax() if unit_strategy is None else unit_strategy
        if isinstance(strategy, type) or not isinstance(strategy, _STRATEGY_TYPES):
            raise TypeError(f"strategy must be an instance of PFA.Strategy.Energy, KL or Size (note the ()), "
                            f"got {strategy!r}")
        if isinstance(unit_strategy, type) or not isinstance(unit_strategy, _SELECTION_TYPES):
            raise TypeError("unit_strategy must be an instance of PFA.UnitSelectionStrategy.AbsMax, AbsMin, L1Max "
                            f"or L1Min (note the ()), got {unit_strategy!r}")
        if not self.statistics:
            raise MocoError(f"no layer could be analysed, so there is no recipe; failed: {dict(self.failed_responses)}")
        spectra = {name: st.eigenvalues for name, st in self.statistics.items()}
        counts, threshold = strategy.recommend(spectra)
        recipes = {}
        for name, st in self.statistics.items():
            k = counts[name]
            keep = unit_strategy.select(st.covariance, k)
            diag = PFADiagnostics(
                strategy=strategy.name,
                unit_strategy=unit_strategy.name,
                kept_energy=_strat.kept_energy(st.eigenvalues, k),
                kl_divergence=_strat.kl_divergence(st.eigenvalues),
                units_ratio=k / st.units,
                energy_threshold=threshold,
            )
            recipes[name] = PFARecipe(name, st.units, int(k), frozenset(int(i) for i in keep), diag)
        return recipes

    # ------------------------------------------------------------------ display
    @staticmethod
    def show(
        recipes: Any,
        *,
        vis_type: VisType | str | None = None,
        kind: str | None = None,
        include_columns: Sequence[str] | None = None,
        path: str | os.PathLike | None = None,
        ax: Any = None,
    ):
        """Show recipes as a pandas table (default) or a matplotlib chart of original vs recommended units.

        Args:
            recipes: the dict from :meth:`get_recipe`, a tuple/list of them (concatenated with a
                ``recipe`` column naming each), or ``{label: recipes}``.
            vis_type: ``PFA.VisType.TABLE`` or ``PFA.VisType.CHART`` (or ``"table"`` / ``"chart"``).
            kind: the same choice as a string (``"table"`` or ``"chart"``); give one of the two.
            include_columns: table columns (None: layer name, original count, recommended count,
                units to keep; ``[]``: all).
            path: table -> CSV file, chart -> PNG file (written atomically).
            ax: chart only: the matplotlib Axes to draw on.

        Returns:
            ``pandas.DataFrame`` (table) or ``matplotlib.axes.Axes`` (chart).
        """
        choice = None
        for given in (vis_type, kind):
            if given is None:
                continue
            try:
                value = VisType(given.value if isinstance(given, VisType) else str(given).lower())
            except ValueError:
                raise MocoError(f"unknown visualisation {given!r}; use PFA.VisType.TABLE/CHART or 'table'/'chart'") from None
            if choice is not None and value != choice:
                raise MocoError(f"vis_type={vis_type!r} and kind={kind!r} disagree; give one of them")
            choice = value
        choice = choice or VisType.TABLE
        if choice is VisType.TABLE:
            if ax is not None:
                raise MocoError("ax= is for charts; pass vis_type=PFA.VisType.CHART")
            return recipes_table(recipes, include_columns=include_columns, path=path)
        if include_columns is not None:
            raise MocoError("include_columns is for tables; a chart shows original and recommended counts")
        return recipes_chart(recipes, path=path, ax=ax)

    @staticmethod
    def keep(recipes: Mapping[str, PFARecipe], *, rename: Mapping[str, str] | Callable[[str], str] | None = None
             ) -> dict[str, list[int]]:
        """``{layer: sorted unit indices}`` for ``moco.compress.surgery.apply(model, keep=...)``.

        ``rename`` maps a response name to the module to prune (a dict or a function), e.g. when the
        analysed response is a conv block's ReLU output and the pruned module its ``Conv2d``.
        """
        out = {}
        for name, recipe in recipes.items():
            if not isinstance(recipe, PFARecipe):
                raise TypeError(f"recipes[{name!r}] is a {type(recipe).__name__}, not a PFARecipe")
            target = rename(name) if callable(rename) else (rename.get(name, name) if rename else name)
            if target in out:
                raise MocoError(f"two recipes map to layer {target!r}; rename each response to its own module")
            out[target] = recipe.keep_indices()
        return out
