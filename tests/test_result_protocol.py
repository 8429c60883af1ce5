"""One result protocol across methods: to_text() (= str()), to_dict() JSON-safe, to_frame() for tables."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import torch
from torch import nn


def _check(result, frame_rows=None):
    text = result.to_text()
    assert isinstance(text, str) and text and str(result) == text
    json.dumps(result.to_dict())  # JSON-safe
    frame = result.to_frame()
    assert isinstance(frame, pd.DataFrame)
    if frame_rows is not None:
        assert len(frame) == frame_rows
    assert "..." not in text  # every column shown


def test_exits_results_follow_the_protocol():
    from moco.exits import attach_exits, calibrate, collect_outputs, evaluate_exits, tradeoff_curve, train_exits

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 3))
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (600,), generator=g)
    x = torch.randn(600, 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float()
    net = attach_exits(model, [2], example_input=x[:1])
    trained = train_exits(net, (x, y), mode="joint", epochs=2, progress=False)
    _check(trained, frame_rows=2)
    cal = calibrate(net, (x, y), target=0.1, progress=False)
    _check(cal, frame_rows=len(cal.family))
    _check(evaluate_exits(net, (x, y)), frame_rows=2)
    _check(tradeoff_curve(net, collect_outputs(net, (x, y))))


def test_frame_text_shows_every_column():
    from moco.results import frame_text, json_safe

    frame = pd.DataFrame([{f"a_very_long_column_name_{i}": i * 1.5 for i in range(40)}])
    text = frame_text(frame)
    assert "..." not in text and "a_very_long_column_name_39" in text
    assert json_safe({"x": np.float32(1.5), "n": float("nan"), 3: (1, 2)}) == {"x": 1.5, "n": None, "3": [1, 2]}


def test_profile_and_layer_suggestion_follow_the_protocol():
    # the profile had no to_frame, the layer suggestion neither to_dict nor to_frame
    from moco.profile import profile
    from moco.rules.branched import suggest_layer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    x = torch.randn(40, 1, 8, 8)
    prof = profile(model, x[:1], latency=False)
    _check(prof, frame_rows=len(prof.rows))

    class Everything:  # a duck-typed rule that fires everywhere (the engine's certification is not the point)
        def __init__(self, n):
            self.n_features, self.num_classes, self.layer = n, 3, None

        def assign(self, features):
            return torch.ones(len(features), dtype=torch.bool), torch.zeros(len(features), dtype=torch.long)

    result = suggest_layer(model, x, candidates=[1, 2], fit=lambda f, p: Everything(f.shape[1]), progress=False)
    _check(result, frame_rows=2)
    assert result.to_dict()["best"] == result.best.layer and len(result.to_dict()["table"]) == 2
