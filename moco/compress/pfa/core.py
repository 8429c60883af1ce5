"""The :class:`PFA` introspector (DNIKit's API shape): introspect, get recipes, show them."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any, Callable, Sequence

import torch
from torch import nn

from moco.compress.pfa import selection as _sel
from moco.compress.pfa import strategies as _strat
from moco.compress.pfa.introspect import ModelProducer, pooler, stream_model, stream_responses
from moco.compress.pfa.show import VisType, recipes_chart, recipes_table
from moco.compress.pfa.stats import LayerStatistics
from moco.errors import MocoError

__all__ = ["PFA", "PFADiagnostics", "PFARecipe", "PFARecipes", "FailedResponses"]


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
        active_units: units whose variance is above ``epsilon_inactive`` x the layer's largest.
        inactive_kept: inactive units kept because the recipe asked for more units than are active
            (DNIKit keeps only the active ones; moco fills the count with the inactive units of largest
            variance, since removing a constant-but-nonzero unit shifts the next layer's input).
        note: a sentence when something deserves attention (``inactive_kept > 0``), else ``""``.
    """

    strategy: str
    unit_strategy: str
    kept_energy: float
    kl_divergence: float
    units_ratio: float
    energy_threshold: float | None = None
    active_units: int | None = None
    inactive_kept: int = 0
    note: str = ""

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
    inactive_units: frozenset = frozenset()

    # DNIKit's names for the same fields
    @property
    def original_output_count(self) -> int:
        """DNIKit's name of :attr:`original_count`."""
        return self.original_count

    @property
    def recommended_output_count(self) -> int:
        """DNIKit's name of :attr:`recommended_count`."""
        return self.recommended_count

    @property
    def number_inactive_units(self) -> int:
        """Units of the layer whose variance is below ``epsilon_inactive`` x the largest (DNIKit's field)."""
        return len(self.inactive_units)

    @property
    def maximally_correlated_units(self) -> list[int]:
        """The units the recipe removes (DNIKit's field): removed inactive units first, then the others, each sorted."""
        removed = set(range(self.original_count)) - set(self.units_to_keep)
        dead = sorted(removed & set(self.inactive_units))
        return dead + sorted(removed - set(dead))

    def keep_indices(self) -> list[int]:
        """``sorted(units_to_keep)``: the form ``moco.compress.surgery.apply(keep=...)`` takes."""
        return sorted(self.units_to_keep)

    def to_dict(self) -> dict:
        """JSON-able dict (units as sorted lists)."""
        return {
            "layer_name": self.layer_name,
            "original_count": self.original_count,
            "recommended_count": self.recommended_count,
            "units_to_keep": self.keep_indices(),
            "inactive_units": sorted(self.inactive_units),
            "diagnostics": self.diagnostics.to_dict(),
        }

    def to_frame(self):
        """A one-row pandas DataFrame with every column of :meth:`PFA.show`."""
        return PFA.show({self.layer_name: self}, include_columns=[])

    def to_text(self) -> str:
        """One readable line: layer, counts, ratio, strategy and any note."""
        d = self.diagnostics
        text = (f"{self.layer_name}: keep {self.recommended_count} of {self.original_count} units "
                f"({d.units_ratio:.1%}, {d.strategy}, {d.unit_strategy}, kept energy {d.kept_energy:.3f})")
        return text + (f"; {d.note}" if d.note else "")

    def __str__(self) -> str:
        return self.to_text()


class PFARecipes(dict):
    """``{layer: PFARecipe}`` as returned by :meth:`PFA.get_recipe` (a dict), with the result protocol."""

    def to_dict(self) -> dict:
        """``{layer: recipe.to_dict()}`` (JSON-able)."""
        return {name: recipe.to_dict() for name, recipe in self.items()}

    def to_frame(self):
        """A pandas DataFrame with every column of :meth:`PFA.show`, one row per layer."""
        return PFA.show(dict(self), include_columns=[])

    def to_text(self) -> str:
        """An aligned table (every column shown, no truncation) of the recipes and their notes."""
        if not self:
            return "no recipes"
        frame = PFA.show(dict(self), include_columns=["layer name", "original count", "recommended count",
                                                      "units ratio", "kept energy", "PFA strategy",
                                                      "unit selection"])
        total = sum(r.original_count for r in self.values())
        kept = sum(r.recommended_count for r in self.values())
        lines = [frame.to_string(index=False), f"units kept: {kept} of {total} ({kept / total:.1%})"]
        lines += [f"{name}: {r.diagnostics.note}" for name, r in self.items() if r.diagnostics.note]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()


class FailedResponses(Mapping):
    """``{layer: reason}`` of the layers PFA could not analyse; equal to a list of their names, as in DNIKit.

    ``pfa.failed_responses == ["conv_pw_13"]`` compares the names (DNIKit's ``failed_responses`` is a list);
    ``pfa.failed_responses["conv_pw_13"]`` gives the reason.
    """

    def __init__(self, reasons: Mapping[str, str]):
        self._reasons = dict(reasons)

    def __getitem__(self, name: str) -> str:
        return self._reasons[name]

    def __iter__(self):
        return iter(self._reasons)

    def __len__(self) -> int:
        return len(self._reasons)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, tuple)):
            return list(self._reasons) == list(other)
        if isinstance(other, (set, frozenset)):
            return set(self._reasons) == other
        if isinstance(other, Mapping):
            return dict(self._reasons) == dict(other)
        return NotImplemented

    def __hash__(self) -> int:  # read-only, hashable by content like a tuple of names
        return hash(tuple(self._reasons))

    def __repr__(self) -> str:
        return f"FailedResponses({self._reasons!r})"


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
        failed_responses: ``{layer: reason}`` (:class:`FailedResponses`, read-only; equal to the list of
            names, as DNIKit's).
        epsilon_inactive: the inactive-unit threshold given to :meth:`introspect` (None: the unit
            strategy's own).
        responses: ``{layer: the tensor analysed}``, e.g. ``"conv1 -> bn1 -> relu"`` (model introspection).
    """

    statistics: Mapping[str, LayerStatistics]
    failed_responses: Mapping[str, str]
    epsilon_inactive: float | None = None
    responses: Mapping[str, str] = dataclasses.field(default_factory=dict)

    Strategy = _Strategies
    UnitSelectionStrategy = _UnitSelection
    VisType = VisType

    def __post_init__(self) -> None:
        object.__setattr__(self, "statistics", MappingProxyType(dict(self.statistics)))
        object.__setattr__(self, "failed_responses", FailedResponses(self.failed_responses))
        object.__setattr__(self, "responses", MappingProxyType(dict(self.responses)))
        eps = self.epsilon_inactive
        if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < 1):
            raise MocoError(f"epsilon_inactive is a fraction of the largest unit variance in [0, 1), got {eps!r}")

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
        epsilon_inactive: float | None = None,
        response: str = "activation",
    ) -> "PFA":
        """Stream responses and compute per-layer count, mean, covariance and eigenvalues (float64).

        Args:
            source: with ``model``: the data to run it on (a tensor ``[N, ...]``, an ``(x, y)`` pair,
                a Dataset or a DataLoader). Without ``model``: an iterable of batches
                ``{layer name: [B, units] array}`` (numpy or torch; ``[B, C, H, W]`` is pooled), one
                such mapping, objects with a ``fields`` mapping (DNIKit batches), or a DNIKit-style
                *producer*: a callable ``producer(batch_size)`` returning such batches.
            model: the network to analyse; run in eval mode under ``torch.inference_mode()`` (flags
                restored, nothing registered on it).
            layers: qualified module names (``model.named_modules()``) to analyse, or the response
                names to keep from ``source``. Name a layer by the ``Conv2d`` / ``Linear`` that owns
                the units: its response is taken after its BatchNorm/activation chain (found with
                torch.fx, also when functional, e.g. ``F.relu(self.bn(self.conv(x)))``; see
                ``pfa.responses``), and the recipes are keyed by that name, ready for
                ``surgery.apply(model, PFA.keep(recipes))``. Any other module is analysed at its own
                output. None: every Conv2d and Linear module but the last one (the classifier) /
                every response in the batches.
            pooling: spatial pooling of ``[B, C, H, W]`` responses to ``[B, C]``: ``"max"`` (as in
                the seed), ``"avg"`` / ``"mean"``, None (responses must be 2-D), or a callable.
            batch_size: samples per forward pass (model and tensor/Dataset data; a DataLoader's own
                batch size wins); pre-computed batches are used as they come.
            progress: show a tqdm bar.
            epsilon_inactive: a unit whose variance is below this fraction of the layer's largest
                unit variance is *inactive* (DNIKit's argument; DNIKit's default is 1e-8). None: the
                unit strategy's own ``inactive_epsilon`` (default 1e-6).
            response: ``"activation"`` (default, see ``layers``) or ``"output"`` (every named
                module's own output, e.g. a conv before its BatchNorm).

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
        described: dict[str, str] = {}
        skipped: dict[str, str] = {}
        if model is not None:
            if not isinstance(model, nn.Module):
                raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
            acc, order, described, skipped = stream_model(model, source, names, pool, batch_size, progress, response)
        else:
            if isinstance(source, nn.Module):
                raise TypeError("source is a model: call PFA.introspect(data, model=model, ...)")
            if callable(source) and not isinstance(source, (Mapping, torch.Tensor)) and not hasattr(source, "__iter__"):
                described = dict(getattr(source, "described", {}))
                source = source(batch_size)  # a DNIKit-style producer: producer(batch_size) -> batches
            acc, order = stream_responses(source, names, pool, progress)
        stats: dict[str, LayerStatistics] = {}
        failed: dict[str, str] = dict(skipped)
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
        return cls(stats, failed, epsilon_inactive, described)

    @staticmethod
    def producer(data: Any, *, model: nn.Module, layers: str | Sequence[str] | None = None,
                 pooling: str | Callable | None = "max", response: str = "activation",
                 progress: bool = False) -> ModelProducer:
        """A DNIKit-style producer of a model's pooled responses, for ``PFA.introspect(producer, batch_size=...)``.

        moco's stand-in for DNIKit's ``pipeline(dataset, model(responses), Pooler(dim=(1, 2), method=MAX))``:
        ``producer(batch_size)`` yields ``{layer: [B, units]}`` batches (see :class:`ModelProducer`).
        """
        return ModelProducer(model, data, None if layers is None else list([layers] if isinstance(layers, str) else layers),
                             pooling=pooling, response=response, progress=progress)

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
            unit_strategy: ``PFA.UnitSelectionStrategy.L1Max()`` (default, as DNIKit), ``.AbsMax()``,
                ``.AbsMin()`` or ``.L1Min()``.

        Returns:
            ``{layer: PFARecipe}`` for every analysed layer (failed ones are in ``failed_responses``),
            in layer order.
        """
        strategy = _strat.KL() if strategy is None else strategy
        unit_strategy = _sel.L1Max() if unit_strategy is None else unit_strategy
        if isinstance(strategy, type) or not isinstance(strategy, _STRATEGY_TYPES):
            raise TypeError(f"strategy must be an instance of PFA.Strategy.Energy, KL or Size (note the ()), "
                            f"got {strategy!r}")
        if isinstance(unit_strategy, type) or not isinstance(unit_strategy, _SELECTION_TYPES):
            raise TypeError("unit_strategy must be an instance of PFA.UnitSelectionStrategy.AbsMax, AbsMin, L1Max "
                            f"or L1Min (note the ()), got {unit_strategy!r}")
        if not self.statistics:
            raise MocoError(f"no layer could be analysed, so there is no recipe; failed: {dict(self.failed_responses)}")
        if self.epsilon_inactive is not None:
            unit_strategy = dataclasses.replace(unit_strategy, inactive_epsilon=float(self.epsilon_inactive))
        spectra = {name: st.eigenvalues for name, st in self.statistics.items()}
        counts, threshold = strategy.recommend(spectra)
        recipes = PFARecipes()
        for name, st in self.statistics.items():
            k = counts[name]
            keep = unit_strategy.select(st.covariance, k)
            inactive = _sel.inactive_units(st.covariance, unit_strategy.inactive_epsilon)
            active = st.units - len(inactive)
            padded = max(0, int(k) - active)
            note = (f"the recipe keeps {int(k)} units but only {active} are active: {padded} inactive units "
                    f"(variance <= {unit_strategy.inactive_epsilon:g} x the largest) fill the count; DNIKit would "
                    f"keep only the {active} active ones") if padded else ""
            diag = PFADiagnostics(
                strategy=strategy.name,
                unit_strategy=unit_strategy.name,
                kept_energy=_strat.kept_energy(st.eigenvalues, k),
                kl_divergence=_strat.kl_divergence(st.eigenvalues),
                units_ratio=k / st.units,
                energy_threshold=threshold,
                active_units=active,
                inactive_kept=padded,
                note=note,
            )
            recipes[name] = PFARecipe(name, st.units, int(k), frozenset(int(i) for i in keep), diag,
                                      frozenset(int(i) for i in inactive))
        return recipes

    # ------------------------------------------------------------------ display
    @staticmethod
    def show(
        recipes: Any,
        *,
        vis_type: VisType | str | None = None,
        kind: str | None = None,
        include_columns: Sequence[str] | None = None,
        exclude_columns: Sequence[str] | None = None,
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
            exclude_columns: table columns to leave out of those (as DNIKit).
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
            return recipes_table(recipes, include_columns=include_columns, exclude_columns=exclude_columns, path=path)
        if include_columns is not None or exclude_columns is not None:
            raise MocoError("include_columns/exclude_columns are for tables; a chart shows original and recommended counts")
        return recipes_chart(recipes, path=path, ax=ax)

    @staticmethod
    def keep(recipes: Mapping[str, PFARecipe], *, rename: Mapping[str, str] | Callable[[str], str] | None = None,
             model: nn.Module | None = None, example_input: Any = None) -> dict[str, list[int]]:
        """``{layer: sorted unit indices}`` for ``moco.compress.surgery.apply(model, keep=...)``.

        ``rename`` maps a response name to the module to prune (a dict or a function), e.g. when the
        analysed response is a conv block's ReLU output and the pruned module its ``Conv2d``.
        ``model`` and ``example_input``: keep one recipe per dependency group (layers tied by a residual
        add or a depthwise conv must keep the same units; the first layer's recipe is kept, the others
        follow it in surgery; the output layer's is dropped: :func:`moco.compress.pfa.leader_recipes`).
        Without them every recipe is kept, and surgery refuses tied layers whose recipes differ.
        """
        if (model is None) != (example_input is None):
            raise MocoError("PFA.keep: pass both model and example_input (to keep one recipe per tied group), or "
                            "neither")
        named: dict[str, PFARecipe] = {}
        for name, recipe in recipes.items():
            if not isinstance(recipe, PFARecipe):
                raise TypeError(f"recipes[{name!r}] is a {type(recipe).__name__}, not a PFARecipe")
            target = rename(name) if callable(rename) else (rename.get(name, name) if rename else name)
            if target in named:
                raise MocoError(f"two recipes map to layer {target!r}; rename each response to its own module")
            named[target] = recipe
        if model is not None:
            from moco.compress.pfa.loop import leader_recipes

            named = leader_recipes(named, model, example_input)[0]
        return {name: recipe.keep_indices() for name, recipe in named.items()}
