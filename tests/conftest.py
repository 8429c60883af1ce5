"""Test settings: a private cache folder (nothing written to the user's cache) and a headless plot backend."""

import os

import matplotlib
import pytest
import torch

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


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op thread for the suite: on a busy 2-core machine, thread hand-offs make the small
    convolutions of these tests 100x slower. Benchmarks (not tests) measure the threaded speed."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def seed_cnn():
    """Seed 000's CNN with seeded random weights, in eval mode (shared by the split, capture and branch tests)."""
    from moco.models import create

    torch.manual_seed(0)
    return create("seed_cnn").eval()
