"""Principal Filter Analysis (seed 001, DNIKit's ``PFA``): how many units each layer needs, and which.

``PFA.introspect`` streams a layer's spatially pooled responses into float64 count/mean/covariance
(Chan's update) and eigenvalues; ``pfa.get_recipe(strategy=..., unit_strategy=...)`` turns the spectra
into per-layer unit counts (``Energy``, ``KL``, ``Size``) and unit indices (``AbsMax``, ``AbsMin``,
``L1Max``, ``L1Min`` on Pearson correlations); ``PFA.show`` tabulates or charts them; ``PFA.keep``
feeds them to ``moco.compress.surgery.apply``.

    from moco.compress.pfa import PFA
    pfa = PFA.introspect(x_train[:4000], model=model, layers=["features.0", "features.1"])
    recipes = pfa.get_recipe(strategy=PFA.Strategy.Energy(energy_threshold=0.99, min_kept_count=3))
    PFA.show(recipes)                       # pandas DataFrame
"""

from moco.compress.pfa.core import PFA, PFADiagnostics, PFARecipe
from moco.compress.pfa.selection import AbsMax, AbsMin, L1Max, L1Min
from moco.compress.pfa.show import VisType
from moco.compress.pfa.stats import LayerStatistics, RunningCovariance
from moco.compress.pfa.strategies import KL, Energy, Size

__all__ = [
    "PFA", "PFADiagnostics", "PFARecipe", "LayerStatistics", "RunningCovariance", "VisType",
    "Energy", "KL", "Size", "AbsMax", "AbsMin", "L1Max", "L1Min",
]
