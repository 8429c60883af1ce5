"""The package surface: every public module defines __all__ naming things it has, dir(moco) lists the lazy names."""

from __future__ import annotations

import importlib
import pkgutil

import moco


def _modules():
    for info in pkgutil.walk_packages(moco.__path__, "moco."):
        if not any(part.startswith("_") for part in info.name.split(".")[1:]):
            yield info.name


def test_every_public_module_defines_all():
    missing, dangling = [], []
    for name in _modules():
        mod = importlib.import_module(name)
        names = getattr(mod, "__all__", None)
        if names is None:
            missing.append(name)
            continue
        dangling += [f"{name}.{n}" for n in names if not hasattr(mod, n)]
    assert not missing, f"modules without __all__: {missing}"
    assert not dangling, f"__all__ names that do not exist: {dangling}"


def test_dir_lists_the_lazy_top_level_names():
    names = dir(moco)
    for lazy in ("AnalyticsEngine", "BranchedNetwork", "build_embeddings_and_predictions", "load_rules"):
        assert lazy in names and getattr(moco, lazy) is not None
