"""moco.deploy.lanes: few-channel convolutions in batch lanes, equal to the model, and how the runtime uses them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moco.deploy import export, load
from moco.deploy.exporter import _lane_graphs, _tune
from moco.deploy.lanes import LaneStack, lane_model
from moco.errors import MocoError

REPO = Path(__file__).resolve().parents[1]


def _pruned_like(seed: int = 0) -> nn.Sequential:
    """seed 003's fashion_cnn as pruning leaves it: 3 and 5 channels, flatten, two linears (12x12 input)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(5 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 10)).eval()


class _Mixed(nn.Module):
    """BatchNorm (folded), functional activations, padding, stride, groups, pooling; then a wide conv (not rewritten)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, stride=2, groups=2)
        self.bn2 = nn.BatchNorm2d(4)
        self.act = nn.Hardswish(inplace=True)
        self.wide = nn.Conv2d(4, 32, 1)
        self.fc = nn.Linear(32, 10)
        g = torch.Generator().manual_seed(1)
        for bn in (self.bn1, self.bn2):
            bn.running_mean.uniform_(-1, 1, generator=g)
            bn.running_var.uniform_(0.5, 2, generator=g)
            bn.weight.data.uniform_(0.5, 2, generator=g)
            bn.bias.data.uniform_(-1, 1, generator=g)

    def forward(self, x):
        x = F.relu(self.bn1(self.c1(x)))
        x = F.max_pool2d(x, 2)
        x = self.act(self.bn2(torch.sigmoid(self.c2(x))))
        return self.fc(self.wide(x).mean((2, 3)))


def test_lane_model_equals_the_model():
    torch.manual_seed(0)
    small, x = _pruned_like(), torch.randn(16, 1, 12, 12)
    lanes = lane_model(small, 16, x)
    assert isinstance(lanes.moco_lanes, LaneStack) and lanes.moco_lanes.flat  # flatten + linear folded in
    with torch.no_grad():
        assert (lanes(x) - small(x)).abs().max() < 1e-5
    mixed, x3 = _Mixed().eval(), torch.randn(8, 3, 20, 20)
    lanes = lane_model(mixed, 8, x3)
    assert lanes is not None and not lanes.moco_lanes.flat
    assert "wide" in dict(lanes.named_modules())  # 4 x 32 = 128 channel pairs: beyond MAX_PAIRS, kept as it is
    with torch.no_grad():
        before = x3.clone()
        assert (lanes(x3) - mixed(x3)).abs().max() < 1e-5
        assert torch.equal(x3, before)  # an in-place activation never touches the caller's input
    with pytest.raises(ValueError, match="exactly 8 images"):
        lanes(x3[:3])
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(mixed.parameters(), lanes.parameters()))


def test_lane_model_declines_what_it_cannot_rewrite():
    x = torch.randn(4, 1, 12, 12)
    wide = nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3)).eval()
    assert lane_model(wide[2:], 4, torch.randn(4, 16, 10, 10)) is None  # 256 channel pairs in the first conv
    assert lane_model(nn.Sequential(nn.Flatten(), nn.Linear(144, 10)), 4, x) is None  # no convolution
    assert lane_model(nn.Linear(3, 2), 4, torch.randn(4, 3)) is None  # not a 4-d input

    class Branchy(nn.Module):  # data-dependent control flow: torch.fx cannot trace it
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return self.c(x) if x.sum() > 0 else -self.c(x)

    assert lane_model(Branchy(), 4, x) is None


def _with_lanes(model: nn.Module, x: torch.Tensor, folder: Path) -> dict:
    """Export without tuning, then attach the lane graph of 64 to the manifest by hand (deterministic)."""
    export(model, folder, x[:4], tune=False)
    lanes = _lane_graphs(model, x[:4], folder, "model")
    doc = json.loads((folder / "manifest.json").read_text())
    doc["graphs"]["fp32"][0]["lanes"] = {**lanes[64], "batch": 64}
    (folder / "manifest.json").write_text(json.dumps(doc))
    return doc


def test_runtime_runs_lane_batches_and_pads_the_tail(tmp_path):
    model, x = _pruned_like(), torch.randn(200, 1, 12, 12)
    _with_lanes(model, x, tmp_path / "m")
    rt = load(tmp_path / "m", intra_op_num_threads=1)
    assert rt.graphs[0].lanes_batch == 64 and rt.graphs[0].config["lanes_batch"] == 64
    with torch.no_grad():
        ref = model(x).numpy()
    for n in (1, 63, 64, 65, 128, 200):  # below one lane batch: the plain graph; else lanes, the tail zero-padded
        out = rt(x[:n].numpy())
        assert out.shape == (n, 10) and np.abs(out - ref[:n]).max() < 1e-4
    assert load(tmp_path / "m", optimization="all").graphs[0].lanes is None  # an explicit level: plain graphs only
    from moco.deploy import op_profile

    prof = op_profile(tmp_path / "m", x[:128].numpy(), runs=2)
    assert {r.graph for r in prof.rows} == {"model.lanes64.onnx"}  # 128 samples: two lane calls, no plain call
    assert {r.calls for r in prof.rows} == {2}


def test_lanes_entry_is_checked(tmp_path):
    model, x = _pruned_like(), torch.randn(16, 1, 12, 12)
    doc = _with_lanes(model, x, tmp_path / "m")
    manifest = tmp_path / "m" / "manifest.json"
    lanes = doc["graphs"]["fp32"][0]["lanes"]
    for bad in ({**lanes, "batch": 0}, {**lanes, "file": "../x.onnx"}, {"file": lanes["file"]}):
        doc["graphs"]["fp32"][0]["lanes"] = bad
        manifest.write_text(json.dumps(doc))
        with pytest.raises(MocoError, match="lanes entry"):
            load(tmp_path / "m")
    doc["graphs"]["fp32"][0]["lanes"] = {**lanes, "sha256": "0" * 64}
    manifest.write_text(json.dumps(doc))
    with pytest.raises(MocoError, match="does not match its sha256"):
        load(tmp_path / "m")
    doc["graphs"]["fp32"][0]["lanes"] = lanes
    manifest.write_text(json.dumps(doc))
    (tmp_path / "m" / lanes["file"]).unlink()
    with pytest.raises(MocoError, match="is missing"):
        load(tmp_path / "m")


def test_tune_refuses_a_lane_graph_that_disagrees(tmp_path):
    """A lane graph is checked against the plain one before it may compete (here: another model's weights)."""
    model, other, x = _pruned_like(0), _pruned_like(1), torch.randn(16, 1, 12, 12)
    export(model, tmp_path / "m", x[:4], tune=False)
    wrong = _lane_graphs(other, x[:4], tmp_path / "m", "other")
    right = _lane_graphs(model, x[:4], tmp_path / "m", "model")
    item = json.loads((tmp_path / "m" / "manifest.json").read_text())["graphs"]["fp32"][0]
    _tune(tmp_path / "m", [item], [x[:4].numpy()], 1, lanes=[{64: wrong[64], 256: right[256]}], budget_s=10.0)
    assert "64" in item["lanes_refused"] and "logits differ" in item["lanes_refused"]["64"]
    assert set(item["session"]["lanes_measured_s"]) == {"256"}  # the good one was timed
    assert item.get("lanes", {}).get("batch", 256) == 256


def test_export_tunes_lanes_and_stays_correct(tmp_path):
    """The full export path: lane graphs built, timed against the plain settings; whatever wins, the check holds."""
    model, x = _pruned_like(), torch.randn(300, 1, 12, 12)
    res = export(model, tmp_path / "m", x[:32], check=x)
    item = json.loads((tmp_path / "m" / "manifest.json").read_text())["graphs"]["fp32"][0]
    assert set(item["session"]["lanes_measured_s"]) == {"64", "256"}
    assert res.fp32.agreement == 1.0
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert ("lanes" in item) == any("lanes" in f for f in files)  # only the chosen lane graph is installed
    with torch.no_grad():
        assert np.abs(load(tmp_path / "m")(x.numpy()) - model(x).numpy()).max() < 1e-4
    single = export(model, tmp_path / "s.onnx", x[:32])  # one file cannot carry a second graph: no lanes
    assert "lanes" not in str(single.sessions)


def test_lane_runtime_needs_no_torch(tmp_path):
    model, x = _pruned_like(), torch.randn(100, 1, 12, 12)
    _with_lanes(model, x, tmp_path / "m")
    with torch.no_grad():
        np.savez(tmp_path / "d.npz", x=x.numpy(), y=model(x).numpy())
    script = f"""
import sys
sys.modules["torch"] = None
import numpy as np
from moco.deploy import load
d = np.load({str(tmp_path / 'd.npz')!r})
rt = load({str(tmp_path / 'm')!r})
assert rt.graphs[0].lanes is not None and np.abs(rt(d["x"]) - d["y"]).max() < 1e-4
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
