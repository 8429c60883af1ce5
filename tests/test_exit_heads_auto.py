"""Exit heads sized for the model: the default ("auto") head costs at most 5% of the model's MACs, and
auto_points finds a point on a small user model (functional activations, BatchNorm, residual + SE)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _mynet():
    spec = importlib.util.spec_from_file_location("mynet_heads_test", EXAMPLES / "mynet.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    return mod.Net(width=16).eval()


def test_auto_heads_cost_at_most_five_percent_of_the_model():
    from moco.exits import attach_exits, auto_points
    from moco.profile import profile

    model = _mynet()
    x = torch.randn(1, 1, 28, 28)
    total = profile(model, x, latency=False).totals.macs
    points = auto_points(model, x)
    assert points, "auto_points finds a point on a small model"
    for pts in (points, ["block"], ["stem", "block"]):
        net = attach_exits(model, pts, example_input=x)
        assert all(h <= 0.05 * total for h in net.costs.head_macs), (pts, net.costs.head_macs, total)
    # the old default (one conv block) would have cost far more than 5% here
    big = attach_exits(model, ["block"], example_input=x, head="conv_pool_linear")
    assert big.costs.head_macs[0] > 0.05 * total


def test_choose_head_prefers_the_strongest_within_budget():
    from moco.exits.heads import choose_head, head_macs

    shape = (16, 14, 14)
    generous = choose_head(shape, 10, 1e9)
    assert generous.spec()["type"] == "conv_pool_linear" and generous.spec()["options"].get("depth") == 2
    tight = choose_head(shape, 10, 100)
    assert tight.spec() == {"type": "pool_linear", "options": {"pool_size": 1}}
    mid_budget = head_macs(choose_head(shape, 10, 60_000), shape, 10)
    assert mid_budget <= 60_000
    assert choose_head((64,), 10, 1).spec()["type"] == "pool_linear"  # flat activations: a linear head
