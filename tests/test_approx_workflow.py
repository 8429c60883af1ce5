"""moco.approx: noise search, multiplier selection, deployment, retraining and the whole workflow on a tiny model."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moco.approx import multipliers as M
from moco.approx.agn import enable_noise, noise_penalty, op_fractions, sigmas, train_gradient
from moco.approx.lut import LUTConv2d, LUTLinear
from moco.approx.quant import QuantConv2d, quant_layers, quantize
from moco.approx.select import deploy_multipliers, select_multipliers, uniform_assignment
from moco.approx.workflow import closest_multiplier, run_approx
from moco.errors import MocoError


def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 2))


def tiny_data(n=384, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x[:, :, 2:6, 2:6].mean((1, 2, 3)) > 0).long()
    return x, y


LIB = [M.exact(), M.truncated(4), M.truncated(7), M.broken_array(2, 6), M.broken_array(3, 8), M.truncated(9)]


def test_gradients_reach_sigma():
    x, y = tiny_data(64)
    q = enable_noise(quantize(tiny_net(), x), 0.1).train()
    fr = op_fractions(q, x)
    assert set(fr) == {"0", "4"} and abs(sum(fr.values()) - 1) < 1e-9
    loss = F.cross_entropy(q(x), y) - 0.2 * noise_penalty(q, fr, 0.5)
    loss.backward()
    for _, layer in quant_layers(q):
        assert layer.sigma.grad is not None and layer.sigma.grad.abs() > 0
    q.eval()
    assert torch.equal(q(x), q(x))  # no noise in eval mode


def test_sigma_moves_with_lambda():
    x, y = tiny_data()
    q = quantize(tiny_net(), x)
    found = {}
    for lmbd in (0.0, 2.0):
        m = quantize(tiny_net(), x)
        m.load_state_dict(q.state_dict())
        res = train_gradient(m, (x, y), lmbd=lmbd, initial_noise=0.05, epochs=2, lr=1e-2, batch_size=64,
                             progress=False)
        found[lmbd] = res.sigma
        assert len(res.history) == 2 and set(res.history[-1]["sigma"]) == {"0", "4"}
        assert "sigma_l" in res.to_text() and res.to_frame().shape == (2, 2)
    assert found[2.0]["0"] > found[0.0]["0"] + 0.02
    assert found[2.0]["0"] > 0.05  # grew from the initial noise


def test_selection_exact_at_zero_sigma_and_cheaper_as_sigma_grows(tmp_path):
    x, _ = tiny_data()
    q = quantize(tiny_net(), x)
    energies = []
    for s in (0.0, 0.02, 0.1, 0.5):
        res = select_multipliers(q, x, LIB, sigma={"0": s, "4": s})
        energies.append(res.relative_energy_consumption)
        if s == 0.0:
            assert set(res.assignment.values()) == {"exact"} and res.relative_energy_consumption == 1.0
        assert all(l.fits and l.error_std <= l.tolerance for l in res.layers)
    assert all(a >= b for a, b in zip(energies, energies[1:])) and energies[-1] < energies[0]
    assert abs(sum(l.relative_opcount for l in res.layers) - 1) < 1e-9
    assert "relative energy consumption" in res.to_text()
    json.dumps(res.to_dict())
    assert list(res.to_frame().index) == ["0", "4"]
    res.plot(tmp_path / "sel.png")
    assert (tmp_path / "sel.png").stat().st_size > 1000


def test_selection_errors():
    x, _ = tiny_data(64)
    q = quantize(tiny_net(), x)
    with pytest.raises(MocoError, match="finite"):
        select_multipliers(q, x, LIB, sigma={"0": float("nan"), "4": 0.1})
    with pytest.raises(MocoError, match="no sigma"):
        select_multipliers(q, x, LIB)
    with pytest.raises(MocoError, match="non-empty"):
        select_multipliers(q, x, [], sigma={"0": 0.1, "4": 0.1})
    with pytest.raises(MocoError, match="data"):
        select_multipliers(q, None, LIB, sigma={"0": 0.1, "4": 0.1})
    enable_noise(q, 0.1)
    q.get_submodule("0").sigma.data.fill_(float("nan"))
    with pytest.raises(MocoError, match="NaN|nan"):
        sigmas(q)


def test_deploy_copies_and_trains_through_lut_layers():
    x, y = tiny_data(64)
    q = quantize(tiny_net(), x)
    res = select_multipliers(q, x, LIB, sigma={"0": 0.3, "4": 0.1})
    d = deploy_multipliers(q, res, LIB)
    assert isinstance(d.get_submodule("0"), LUTConv2d) and isinstance(d.get_submodule("4"), LUTLinear)
    assert type(q.get_submodule("0")) is QuantConv2d  # the input model is not modified
    assert d.get_submodule("0").multiplier.name == res.assignment["0"]
    d.train()
    F.cross_entropy(d(x), y).backward()
    assert d.get_submodule("0").weight.grad.abs().sum() > 0
    u = deploy_multipliers(q, uniform_assignment(q, M.truncated(7)))
    assert {m.multiplier.name for _, m in quant_layers(u)} == {"trunc7"}
    with pytest.raises(MocoError, match="multipliers="):
        deploy_multipliers(q, res)
    assert closest_multiplier(LIB, 0.56).name == "trunc7"


def test_run_approx_end_to_end():
    x, y = tiny_data()
    cfg = {"quant_epochs": 1, "gradient_epochs": 1, "approx_epochs": 1, "batch_size": 64, "progress": False,
           "multipliers": ["exact", "trunc4", "trunc7", "bam_h2_v6"], "lmbd": 1.0, "initial_noise": 0.1}
    lines = []
    r = run_approx(tiny_net(), (x, y), (x, y), cfg, log=lines.append, eval_name="validation")
    d = json.loads(json.dumps(r.to_dict()))
    # the table and the log name the data they measured (moco run passes its holdout, not the test set)
    assert d["evaluated_on"] == "validation" and r.to_text().startswith("accuracy on the validation data")
    assert lines[0].startswith("FP32 baseline: validation accuracy") and not any("test accuracy" in ln for ln in lines)
    for key in ("accuracy_base", "accuracy_quant", "accuracy_approx", "accuracy_uniform", "energy_ratio",
                "energy_ratio_uniform", "sigma", "selected"):
        assert key in d
    assert 0 < d["energy_ratio"] <= 1 and set(d["selected"]) == {"0", "4"}
    assert d["config"]["multipliers"] == ["exact", "trunc4", "trunc7", "bam_h2_v6"]
    assert any("sigma_l" in ln for ln in lines) and "uniform" in r.to_text()
    import pandas as pd

    for res in (r, r.selection, r.search):  # the result protocol
        assert str(res) == res.to_text() and "..." not in res.to_text()
        json.dumps(res.to_dict())
        assert isinstance(res.to_frame(), pd.DataFrame)
    assert str(M.truncated(3).stats()).startswith("trunc3: energy")
    with pytest.raises(MocoError, match="unknown approx config"):
        run_approx(tiny_net(), (x, y), (x, y), {"epochs": 3})
    with pytest.raises(MocoError, match="unknown multiplier"):
        run_approx(tiny_net(), (x, y), (x, y), {"multipliers": ["nope"]})


def test_selection_table_stays_aligned_with_long_layer_names():
    from moco.approx.select import LayerSelection, SelectionResult

    rows = [LayerSelection(name, "trunc4", 0.5, 0.5, 100.0, 0.5, 0.1, 1.0, 0.1, 0.05, True)
            for name in ("0", "blocks.0.se.fc1")]
    lines = SelectionResult(tuple(rows), 1.0, 200.0, ("exact", "trunc4")).to_text().splitlines()
    # every row puts its multiplier in the header's column (a 15-character name pushed its row out)
    assert len({line.index("trunc4") for line in lines[1:3]}) == 1 and lines[0].index("multiplier") == lines[1].index(
        "trunc4")
