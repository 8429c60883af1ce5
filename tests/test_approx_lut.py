"""moco.approx: int8 QAT integer view, the multiplier library and the bit-exact LUT layers."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from moco.approx import multipliers as M
from moco.approx.lut import LUTConv2d, reference_accumulate, to_lut
from moco.approx.quant import QuantConv2d, QuantLinear, calibrate, quant_layers, quantize, replace_layers
from moco.errors import MocoError


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(6, 5, 3, stride=2, bias=True),
                         nn.Flatten(), nn.Linear(45, 7))


def layer_outputs(model, x):
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, (i[0], o)))
             for n, m in quant_layers(model)]
    model(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("per_channel", [False, True])
def test_integer_view_equals_fake_quant_forward(per_channel):
    x = torch.randn(8, 4, 8, 8)
    q = quantize(small_net(), x, per_channel=per_channel).eval()
    outs = layer_outputs(q, x)
    assert set(outs) == {"0", "2", "4"}
    for name, (inp, out) in outs.items():
        layer = q.get_submodule(name)
        view = layer.integer_view(inp)
        assert view.x_q.dtype == torch.int8 and view.w_q.dtype == torch.int8
        assert view.x_zero_point == 0 and view.w_zero_point == 0
        assert view.w_scale.shape == ((layer.weight.shape[0],) if per_channel else (1,))
        torch.testing.assert_close(layer.integer_forward(inp), out, rtol=1e-5, atol=1e-5)
    # QAT changes the float model's output only by quantisation error, and the original is untouched
    net = small_net()
    assert type(net[0]) is nn.Conv2d
    assert (net(x) - q(x)).abs().max() < 0.1 * net(x).abs().max()


def test_exact_table_is_bit_identical_to_exact_int8():
    x = torch.randn(8, 4, 8, 8)
    q = quantize(small_net(), x).eval()
    lut = copy.deepcopy(q)
    replace_layers(lut, [n for n, _ in quant_layers(lut)], lambda n, m: to_lut(m, M.exact()))
    assert isinstance(lut.get_submodule("0"), LUTConv2d)
    for name, (inp, _) in layer_outputs(lut, x).items():
        layer = lut.get_submodule(name)
        v = layer.integer_view(inp)
        got = layer._approx_acc(v.x_q.float(), v.w_q.float())
        assert torch.equal(got.to(torch.int32), layer.integer_accumulate(v.x_q, v.w_q))
        assert torch.equal(layer(inp), q.get_submodule(name).integer_forward(inp))
    torch.testing.assert_close(lut(x), q(x), rtol=1e-5, atol=1e-5)


def custom_multiplier():
    return M.ApproximateMultiplier.from_function("or_low", lambda a, b: a * b - ((a & 3) * (b & 3)),
                                                 performance_metric=0.9)


@pytest.mark.parametrize("mult", M.library() + [custom_multiplier()], ids=lambda m: m.name)
def test_every_family_lut_layer_equals_brute_force(mult):
    q = quantize(small_net(), torch.randn(4, 4, 8, 8))
    gen = torch.Generator().manual_seed(1)
    shapes = {"0": (2, 4, 6, 7), "2": (2, 6, 8, 8), "4": (3, 45)}
    for name, layer in quant_layers(q):
        lut = to_lut(layer, mult)
        x_q = torch.randint(-128, 128, shapes[name], generator=gen).float()
        w_q = torch.randint(-128, 128, layer.weight.shape, generator=gen).float()
        got = lut._approx_acc(x_q, w_q).numpy()
        ref = reference_accumulate(lut, x_q, w_q, mult.approx_table)
        assert got.shape == ref.shape
        assert np.array_equal(got.astype(np.int64), ref), name


def test_error_maps_match_hand_computed_products():
    def err(m, a, b):
        return int(m.error_map[a + 128][b + 128])

    assert err(M.truncated(2), 3, 3) == 5            # drops a0b0 (1) + a0b1 + a1b0 (2 + 2)
    assert err(M.truncated(1), -1, -1) == 1          # all-ones operands: only the column-0 bit is dropped
    assert M.truncated(1)(-1, -1) == 0
    assert err(M.broken_array(1, 0), 5, 3) == 5      # row 0 removed: approx = a * (b - b0)
    assert M.broken_array(1, 0)(-7, 3) == -14
    assert M.drum(3)(100, 5) == 112 * 5               # 100 = 1100100b -> 111 then zeros = 112; 5 stays exact
    assert err(M.drum(3), 100, 5) == -60
    assert M.drum(3)(-100, 5) == -560
    assert M.mitchell()(3, 3) == 8 and M.mitchell()(-3, 3) == -8 and M.mitchell()(0, 77) == 0
    assert M.mitchell()(64, 64) == 4096              # powers of two are exact
    assert M.exact()(-128, -128) == 16384
    for m in M.library():
        assert np.array_equal(m.approx_table, np.outer(np.arange(-128, 128), np.arange(-128, 128)) - m.error_map)


def test_stats_and_energy_model():
    lib = {m.name: m for m in M.library()}
    s = lib["exact"].stats()
    assert s.error_std == 0 and s.worst_case_error == 0 and s.error_probability == 0
    assert lib["exact"].performance_metric == 1.0
    energies = [lib[f"trunc{k}"].performance_metric for k in range(1, 10)]
    assert all(a >= b for a, b in zip(energies, energies[1:])) and energies[-1] < 0.5
    errors = [lib[f"trunc{k}"].stats().error_std for k in range(1, 10)]
    assert all(a < b for a, b in zip(errors, errors[1:]))
    assert M.array_cost(np.ones((8, 8), bool))["AND"] == 64
    table = M.energy_table(M.library())
    assert {"relative_energy", "published", "flag_over_30pct"} <= set(table.columns)
    assert set(M.error_table(M.library()).columns) >= {"mean_error", "error_std", "mean_relative_error",
                                                        "worst_case_error", "error_probability"}


def test_plot_error_map(tmp_path):
    M.plot_error_map(M.truncated(6), tmp_path / "e.png")
    assert (tmp_path / "e.png").stat().st_size > 1000
    name = M.library()[1].name
    M.plot_error_map(name, tmp_path / "n.png")   # a library name works too (it failed with an AttributeError)
    assert (tmp_path / "n.png").stat().st_size > 1000
    with pytest.raises(MocoError, match="unknown multiplier 'nope'; the library has"):
        M.plot_error_map("nope")
    with pytest.raises(TypeError, match="ApproximateMultiplier or a library name"):
        M.plot_error_map(3)


def test_from_table_and_npy(tmp_path):
    table = M.truncated(4).error_map
    np.save(tmp_path / "t.npy", table)
    m = M.ApproximateMultiplier.from_table("t4", tmp_path / "t.npy", performance_metric=0.5)
    assert np.array_equal(m.error_map, table) and m.rank == 0
    p = M.ApproximateMultiplier.from_table("t4p", M.truncated(4).approx_table, performance_metric=0.5, kind="product")
    assert np.array_equal(p.error_map, table)


def test_clear_errors(tmp_path):
    with pytest.raises(MocoError, match="256x256"):
        M.ApproximateMultiplier("bad", 1.0, np.zeros((255, 256)))
    with pytest.raises(MocoError, match="integers"):
        M.ApproximateMultiplier("bad", 1.0, np.full((256, 256), 0.5))
    with pytest.raises(MocoError, match="integers"):
        M.ApproximateMultiplier("bad", 1.0, np.full((256, 256), np.nan))
    with pytest.raises(MocoError, match="performance_metric"):
        M.ApproximateMultiplier("bad", float("nan"), np.zeros((256, 256)))
    with pytest.raises(MocoError, match="do not reproduce"):
        M.ApproximateMultiplier("bad", 1.0, np.zeros((256, 256)), factors=(np.ones((1, 256)), np.ones((1, 256))))
    with pytest.raises(MocoError, match="does not exist"):
        M.ApproximateMultiplier.from_table("x", tmp_path / "missing.npy", performance_metric=1.0)
    net = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(3, 2))
    with pytest.raises(MocoError, match="not supported"):
        quantize(net, torch.randn(2, 2, 5), layers=["0"])
    with pytest.raises(MocoError, match="calibration_data"):
        quantize(small_net(), None)
    with pytest.raises(MocoError, match="empty"):
        quantize(small_net(), torch.randn(0, 4, 8, 8))
    with pytest.raises(MocoError, match="not supported"):
        to_lut(nn.Conv2d(1, 1, 1), M.exact())
    q = quantize(small_net(), torch.randn(2, 4, 8, 8))
    layer = q.get_submodule("0")
    layer.act_max.zero_()
    with pytest.raises(MocoError, match="calibrate"):
        q(torch.randn(1, 4, 8, 8))
    calibrate(q, torch.randn(2, 4, 8, 8))
    assert isinstance(q.get_submodule("0"), QuantConv2d) and isinstance(q.get_submodule("4"), QuantLinear)
    q(torch.randn(1, 4, 8, 8))


def test_export_qdq_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    x = torch.randn(64, 4, 8, 8)
    q = quantize(small_net(), x, per_channel=True)
    res = q.eval()(x).detach()
    from moco.approx.quant import export_qdq

    r = export_qdq(q, tmp_path / "q.onnx", x)
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert r.max_abs_diff < 0.1 * float(res.abs().max())
    assert str(r) == r.to_text() and "agreement" in str(r)
    assert type(q.get_submodule("0")) is QuantConv2d and not q.get_submodule("0").export_qdq
    lut = copy.deepcopy(q)
    replace_layers(lut, ["0"], lambda n, m: to_lut(m, M.truncated(3)))
    with pytest.raises(MocoError, match="ONNX cannot express"):
        export_qdq(lut, tmp_path / "l.onnx", x)
