"""Test settings: a private cache folder (nothing written to the user's cache) and a headless plot backend."""

import os

import matplotlib
import pytest

matplotlib.use("Agg")


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    old = os.environ.get("MOCO_CACHE")
    os.environ["MOCO_CACHE"] = str(tmp_path_factory.mktemp("moco-cache"))
    yield
    if old is None:
        os.environ.pop("MOCO_CACHE", None)
    else:
        os.environ["MOCO_CACHE"] = old
