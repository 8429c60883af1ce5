"""Principal Filter Analysis (seed 001, DNIKit's ``PFA``): how many units each layer needs, and which.

``PFA.introspect`` streams a layer's spatially pooled responses into float64 count/mean/covariance
(Chan's update) and eigenvalues; ``pfa.get_recipe(strategy=..., unit_strategy=...)`` turns the spectra
into per-layer unit counts (``Energy``, ``KL``, ``Size``) and unit indices (``AbsMax``, ``AbsMin``,
``L1Max`` (the default, as DNIKit), ``L1Min`` on Pearson correlations); ``PFA.show`` tabulates or
charts them; ``PFA.keep`` feeds them to ``moco.compress.surgery.apply``. Layers are named by the
``Conv2d`` / ``Linear`` that owns the units; the response analysed is the end of its BatchNorm /
activation chain, found with torch.fx (``pfa.responses`` says which). DNIKit's names work too:
``PFA.introspect(producer, batch_size=500, epsilon_inactive=...)`` with ``producer(batch_size)``
yielding batches, ``recipe.original_output_count`` / ``recommended_output_count`` /
``maximally_correlated_units`` / ``number_inactive_units``, ``PFA.show(exclude_columns=...)``,
``KL(interpolation_function=...)``, ``Size(epsilon_energy=...)``, ``failed_responses == [names]``.
:class:`PFALoop` applies a recipe step by step with fine-tuning until a validation budget is spent.

    from moco.compress.pfa import PFA
    pfa = PFA.introspect(x_train[:4000], model=model, layers=["conv1", "layer1.0.conv1"])
    recipes = pfa.get_recipe(strategy=PFA.Strategy.Energy(energy_threshold=0.99, min_kept_count=3))
    PFA.show(recipes)                       # pandas DataFrame
    small = surgery.apply(model, PFA.keep(recipes), x_train[:1])
"""

from moco.compress.pfa.core import PFA, FailedResponses, PFADiagnostics, PFARecipe, PFARecipes
from moco.compress.pfa.introspect import ModelProducer
from moco.compress.pfa.loop import PFALoop, PFAStep, check_round_to, leader_recipes, partial_keep, rounded_count
from moco.compress.pfa.selection import AbsMax, AbsMin, L1Max, L1Min
from moco.compress.pfa.show import VisType
from moco.compress.pfa.stats import LayerStatistics, RunningCovariance
from moco.compress.pfa.strategies import KL, Energy, Size

__all__ = [
    "PFA", "PFADiagnostics", "PFARecipe", "PFARecipes", "FailedResponses", "ModelProducer", "PFALoop", "PFAStep", "check_round_to", "leader_recipes", "partial_keep", "rounded_count", "LayerStatistics", "RunningCovariance", "VisType",
    "Energy", "KL", "Size", "AbsMax", "AbsMin", "L1Max", "L1Min",
]
