"""moco: make a trained PyTorch classifier cheaper to run while keeping its predictions.

The package follows the user's path: profile -> capture -> analyse -> transform -> verify. The seed
workflow's names are importable from the top level (loaded on first use, so ``moco --help`` stays fast)::

    from moco import AnalyticsEngine, BranchedNetwork, build_embeddings_and_predictions
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "AnalyticsEngine": "moco.rules.engine",
    "LinearRule": "moco.rules.rule",
    "RuleSet": "moco.rules.rule",
    "load_rule": "moco.rules.rule",
    "load_rules": "moco.rules.rule",
    "BranchedNetwork": "moco.rules.branched",
    "suggest_layer": "moco.rules.branched",
    "build_embeddings_and_predictions": "moco.capture",
    "build_embeddings_from_predictions": "moco.capture",  # the seed's import line spells it so
    "capture": "moco.capture",
}

__all__ = ["__version__", *_LAZY]


def __dir__() -> list[str]:
    """The module's names plus the lazily loaded ones, so ``dir(moco)`` and tab completion list them."""
    return sorted(set(globals()) | set(_LAZY))


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moco' has no attribute {name!r}")
