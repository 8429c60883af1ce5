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


class _Block(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.conv2 = torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


class _ConstantWidthNet(torch.nn.Module):
    """A user's residual net: its blocks sit in one torch.nn.Sequential attribute, every block costs the same."""

    def __init__(self, c=4):
        super().__init__()
        self.stem = torch.nn.Conv2d(1, c, 3, stride=2, padding=1)
        self.blocks = torch.nn.Sequential(*[_Block(c) for _ in range(3)])
        self.fc = torch.nn.Linear(c, 3)

    def forward(self, x):
        return self.fc(self.blocks(torch.relu(self.stem(x))).mean((2, 3)))


@pytest.fixture
def constant_width_net():
    """A user's residual net (blocks in one nn.Sequential attribute, every conv the same MACs), eval mode."""
    torch.manual_seed(0)
    return _ConstantWidthNet().eval()
