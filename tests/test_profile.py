"""Tests of moco.profile: exact counts, seed 003's formula, FlopCounterMode agreement, no model mutation."""

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.modules import module as module_globals
from torch.utils.flop_counter import FlopCounterMode

from moco.errors import MocoError
from moco.models import create, input_shape, list_models
from moco.profile import LayerProfile, Profile, profile, seed003_flops
from moco.profile.counting import ZERO_COST_OPS

# Small variants of the zoo so the whole file stays fast.
ZOO_KWARGS = {"resnet18": {"width_multiplier": 0.25}, "mobilenet_v1": {"width_multiplier": 0.25}}


@pytest.fixture(scope="module")
def seed_profile() -> Profile:
    torch.manual_seed(0)
    return profile(create("seed_cnn"), torch.randn(1, 1, 28, 28), repeats=2, warmup=1)


def _fashion_input(batch: int = 1, **kw) -> torch.Tensor:
    return torch.randn(batch, *input_shape("fashion_cnn", **kw))


# ---------------------------------------------------------------- exact counts


def test_seed_cnn_conv2_macs_and_params(seed_profile):
    conv2 = seed_profile.layer("2")
    assert conv2.type == "Conv2d"
    assert conv2.macs == 10_616_832  # 32*3*3 * 64 * 24*24
    assert conv2.output_shape == (1, 64, 24, 24)
    assert conv2.bias_flops == 64 * 24 * 24
    assert conv2.flops == 2 * 10_616_832 + 64 * 24 * 24
    assert conv2.params == 32 * 64 * 9 + 64
    assert seed_profile.totals.params == 1_199_882
    assert seed_profile.total("params") == 1_199_882
    assert seed_profile.bottleneck == "2"


def test_per_sample_divides_by_batch():
    p = profile(create("seed_cnn"), torch.randn(4, 1, 28, 28), latency=False)
    assert p.batch_size == 4
    assert p.layer("2").macs == 4 * 10_616_832
    assert p.per_sample("macs", "2") == 10_616_832
    assert p.per_sample("macs") == p.totals.macs / 4
    assert p.layer("2").output_shape == (4, 64, 24, 24)
    frame = p.to_dataframe()
    assert frame.set_index("name").loc["2", "macs_per_sample"] == 10_616_832


def test_seed_cnn_rows_and_elementwise_rules(seed_profile):
    assert [r.name for r in seed_profile.rows] == [str(i) for i in range(10)]
    assert seed_profile.layer("1").activation_flops == 32 * 26 * 26  # ReLU: 1 per output element
    assert seed_profile.layer("4").other_elementwise_flops == 64 * 24 * 24  # 2x2 max-pool: 4 per output
    assert seed_profile.layer("5").flops == 0  # Flatten is a view
    assert seed_profile.layer("6").bias_flops == 128
    assert seed_profile.layer("4").activation_bytes == 64 * 12 * 12 * 4
    totals = seed_profile.totals
    for column in ("macs", "bias_flops", "activation_flops", "other_elementwise_flops", "activation_bytes"):
        assert getattr(totals, column) == sum(getattr(r, column) for r in seed_profile.rows)
    assert totals.flops == 2 * totals.macs + totals.elementwise_flops
    assert totals.output_shape == (1, 10)


# ---------------------------------------------------------------- seed 003


def test_seed003_table_numbers():
    got = seed003_flops(3, 3, 16, 16, 100)
    assert got == {"conv1": 118_976, "conv2": 1_345_536, "fc1": 921_800, "fc2": 1_010,
                   "total": 118_976 + 1_345_536 + 921_800 + 1_010}


@pytest.mark.parametrize("params", [(3, 3, 16, 16, 100), (3, 3, 8, 32, 50), (3, 3, 1, 24, 6),
                                    (5, 3, 32, 16, 50), (5, 5, 8, 8, 20)])
def test_seed003_formula_equals_profiler(params):
    p = profile(create("fashion_cnn", **dict(zip(
        ("c1_kernel", "c2_kernel", "c1_channels", "c2_channels", "hidden"), params))), _fashion_input(), latency=False)
    expected = seed003_flops(*params)
    assert p.total("macs + bias_flops + activation_flops") == expected["total"]
    assert p.seed003_total() == expected["total"]
    # per layer: the seed folds each ReLU into the layer before it
    layer = {r.name: r for r in p.rows}
    assert layer["0"].macs + layer["0"].bias_flops + layer["1"].activation_flops == expected["conv1"]
    assert layer["2"].macs + layer["2"].bias_flops + layer["3"].activation_flops == expected["conv2"]
    assert layer["5"].macs + layer["5"].bias_flops + layer["6"].activation_flops == expected["fc1"]
    assert layer["7"].macs + layer["7"].bias_flops == expected["fc2"]


@settings(max_examples=12, deadline=None)
@given(k1=st.integers(1, 5), k2=st.integers(1, 5), m1=st.integers(1, 6), m2=st.integers(1, 6),
       hidden=st.integers(1, 12), size=st.integers(10, 16), cin=st.integers(1, 3), classes=st.integers(2, 5))
def test_seed003_formula_property(k1, k2, m1, m2, hidden, size, cin, classes):
    kw = {"input_size": size, "in_channels": cin, "num_classes": classes}
    model = create("fashion_cnn", c1_kernel=k1, c2_kernel=k2, c1_channels=m1, c2_channels=m2, hidden=hidden, **kw)
    p = profile(model, _fashion_input(**{"input_size": size, "in_channels": cin}), latency=False)
    assert p.seed003_total() == seed003_flops(k1, k2, m1, m2, hidden, **kw)["total"]


def test_seed003_rejects_bad_arguments():
    with pytest.raises(MocoError, match="no pixels"):
        seed003_flops(15, 15, 4, 4, 10)
    with pytest.raises(MocoError, match="hidden"):
        seed003_flops(3, 3, 4, 4, 0)


# ---------------------------------------------------------------- FlopCounterMode agreement


def _flop_counter_total(model: nn.Module, *args: torch.Tensor) -> int:
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*args)
    model.train(was_training)
    return counter.get_total_flops()


@pytest.mark.parametrize("name", list_models())
def test_flop_counter_mode_agrees_on_zoo(name):
    kw = ZOO_KWARGS.get(name, {})
    model = create(name, **kw)
    x = torch.randn(2, *input_shape(name, **kw))
    p = profile(model, x, latency=False)
    assert 2 * p.totals.macs == _flop_counter_total(model, x)
    assert p.totals.params == sum(t.numel() for t in model.parameters())
    assert p.unsupported_ops == {}


@pytest.mark.parametrize("layer, shape", [
    (nn.Conv2d(4, 8, 3, stride=2, padding=1), (2, 4, 9, 9)),
    (nn.Conv2d(4, 8, 3, dilation=2, groups=2), (2, 4, 9, 9)),
    (nn.Conv2d(8, 8, 3, groups=8, padding=1, bias=False), (2, 8, 7, 7)),  # depthwise
    (nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), (2, 4, 5, 5)),
    (nn.Conv1d(3, 5, 4, stride=2), (2, 3, 17)),
    (nn.Conv3d(2, 4, 3, padding=(1, 0, 1)), (1, 2, 5, 6, 7)),
    (nn.Linear(8, 4), (2, 5, 8)),
])
def test_flop_counter_mode_agrees_on_conv_variants(layer, shape):
    x = torch.randn(*shape)
    p = profile(layer, x, latency=False)
    assert 2 * p.totals.macs == _flop_counter_total(layer, x)


def test_depthwise_macs_formula():
    conv = nn.Conv2d(8, 16, 3, padding=1, groups=4)  # Cin/groups = 2
    p = profile(conv, torch.randn(3, 8, 10, 10), latency=False)
    assert p.totals.macs == 2 * 3 * 3 * 16 * 10 * 10 * 3
    assert p.totals.bias_flops == 16 * 10 * 10 * 3


# ---------------------------------------------------------------- attribution


class _Functional(nn.Module):
    """Own work in forward (F.linear, x + y, torch.relu) around a child Linear used twice."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 5))
        self.bias = nn.Parameter(torch.randn(6))
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)  # 3x5 @ 5x6 + bias
        z = self.fc(y) + y
        z = self.fc(z)
        return torch.relu(z).view(3, 2, 3).flatten(1)


def test_functional_ops_in_custom_forward_are_counted():
    p = profile(_Functional(), torch.randn(3, 5), latency=False)
    root, fc = p.layer(""), p.layer("fc")
    assert root.type == "_Functional"
    assert root.macs == 3 * 5 * 6
    assert root.bias_flops == 3 * 6
    assert root.activation_flops == 3 * 6  # torch.relu
    assert root.other_elementwise_flops == 3 * 6  # the residual add
    assert root.params == 6 * 5 + 6
    assert fc.calls == 2 and fc.macs == 2 * 3 * 6 * 6 and fc.params == 6 * 6 + 6
    assert fc.output_shape == (3, 6)  # one call's output
    assert fc.activation_bytes == 2 * 3 * 6 * 4  # summed over both calls
    assert p.totals.params == sum(t.numel() for t in _Functional().parameters())
    assert p.totals.macs == root.macs + fc.macs
    assert p.unsupported_ops == {}
    assert 2 * p.totals.macs == _flop_counter_total(_Functional(), torch.randn(3, 5))
    assert "(root)" in p.to_text() and "calls" in p.to_text()


class _Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        x = self.fc(x).t().contiguous().t().reshape(2, 4).clone()
        return torch.sort(torch.cumsum(x, dim=1), dim=1).values


def test_unsupported_ops_are_listed_not_zero():
    p = profile(_Unsupported(), torch.randn(2, 4), latency=False)
    assert p.unsupported_ops == {"aten.cumsum": 1, "aten.sort": 1}
    assert p.layer("").unsupported_ops == ("aten.cumsum", "aten.sort")
    assert p.layer("fc").unsupported_ops == ()
    assert "aten.cumsum x1" in p.to_text()
    assert p.to_dict()["unsupported_ops"] == {"aten.cumsum": 1, "aten.sort": 1}
    assert {"view", "reshape", "t", "transpose", "expand", "detach", "clone", "_to_copy"} <= ZERO_COST_OPS


# ---------------------------------------------------------------- no mutation


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "params": [(n, p, p.data_ptr(), p.requires_grad) for n, p in model.named_parameters()],
        "training": [(n, m.training) for n, m in model.named_modules()],
        "hooks": [(n, dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
                  for n, m in model.named_modules()],
        "attrs": [(n, sorted(vars(m))) for n, m in model.named_modules()],
    }


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), key
    assert [(n, id(p), ptr, g) for n, p, ptr, g in before["params"]] == [
        (n, id(p), ptr, g) for n, p, ptr, g in after["params"]]
    assert before["training"] == after["training"]
    assert before["hooks"] == after["hooks"]
    assert before["attrs"] == after["attrs"]


def test_profile_does_not_mutate_the_model():
    model = create("lenet5")
    model.train()
    model.fc2[1].eval()  # mixed flags must come back exactly
    model.conv1[0].register_forward_hook(lambda *a: None)  # a user's own hook stays as it is
    global_hooks = (len(module_globals._global_forward_hooks), len(module_globals._global_forward_pre_hooks))
    before = _snapshot(model)
    p = profile(model, torch.randn(2, 1, 28, 28), repeats=1, warmup=0)
    _assert_unchanged(model, before)  # BatchNorm running stats included: it ran in eval mode
    assert (len(module_globals._global_forward_hooks), len(module_globals._global_forward_pre_hooks)) == global_hooks
    assert p.totals.params == 61_932
    with pytest.raises(MocoError):
        profile(model, torch.randn(2, 3, 28, 28), latency=False)
    _assert_unchanged(model, before)
    assert (len(module_globals._global_forward_hooks), len(module_globals._global_forward_pre_hooks)) == global_hooks


# ---------------------------------------------------------------- exports


def test_dataframe_text_dict_and_plot(seed_profile, tmp_path):
    frame = seed_profile.to_dataframe()
    for column in ("name", "type", "calls", "output_shape", "params", "macs", "macs_per_sample", "bias_flops",
                   "activation_flops", "other_elementwise_flops", "elementwise_flops", "flops",
                   "activation_bytes", "latency_s", "latency_share"):
        assert column in frame.columns
    assert len(frame) == len(seed_profile.rows)
    assert frame["params"].sum() == 1_199_882
    assert (frame["flops"] == 2 * frame["macs"] + frame["elementwise_flops"]).all()
    with_total = seed_profile.to_dataframe(total=True)
    assert with_total.iloc[-1]["name"] == "total" and with_total.iloc[-1]["macs"] == seed_profile.totals.macs

    text = str(seed_profile)
    assert text == seed_profile.to_text()
    assert "10.6M" in text and "1.2M" in text and "bottleneck (most MACs): 2" in text

    payload = json.loads(json.dumps(seed_profile.to_dict()))
    assert payload["bottleneck"] == "2"
    assert payload["rows"][2]["macs"] == 10_616_832
    assert payload["rows"][2]["output_shape"] == [1, 64, 24, 24]

    path = seed_profile.plot(tmp_path / "plots" / "seed.png")
    assert path == tmp_path / "plots" / "seed.png"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert [f.name for f in path.parent.iterdir()] == ["seed.png"]  # no temp file left behind


def test_latency_columns(seed_profile):
    shares = [r.latency_share for r in seed_profile.rows]
    assert all(s is not None and s >= 0 for s in shares)
    assert sum(shares) == pytest.approx(1.0)
    assert all(r.latency_s >= 0 for r in seed_profile.rows)
    assert seed_profile.slowest in {r.name for r in seed_profile.rows}
    slowest = seed_profile.layer(seed_profile.slowest)
    assert slowest.latency_s == max(r.latency_s for r in seed_profile.rows)
    assert seed_profile.forward_time_s > 0
    assert seed_profile.totals.latency_s == pytest.approx(sum(r.latency_s for r in seed_profile.rows))


def test_without_latency():
    p = profile(create("seed_cnn"), torch.randn(1, 1, 28, 28), latency=False)
    assert p.slowest is None and p.forward_time_s is None
    assert all(r.latency_s is None and r.latency_share is None for r in p.rows)
    assert p.to_dataframe()["latency_s"].isna().all()
    assert "latency: not measured" in p.to_text()
    assert isinstance(p.rows[0], LayerProfile)


def test_total_rejects_unknown_columns(seed_profile):
    with pytest.raises(MocoError, match="unknown column"):
        seed_profile.total("macs + bogus")
    with pytest.raises(MocoError, match="no profiled module"):
        seed_profile.layer("99")


# ---------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    model = create("seed_cnn")
    with pytest.raises(TypeError, match="torch.Tensor"):
        profile(model, [[0.0] * 28] * 28)
    with pytest.raises(TypeError, match="torch.as_tensor"):
        profile(model, torch.randn(1, 1, 28, 28).numpy())
    with pytest.raises(TypeError, match="nn.Module"):
        profile(lambda x: x, torch.randn(1, 1, 28, 28))
    with pytest.raises(TypeError, match="repeats"):
        profile(model, torch.randn(1, 1, 28, 28), repeats=2.5)
    with pytest.raises(MocoError, match="repeats"):
        profile(model, torch.randn(1, 1, 28, 28), repeats=0)
    with pytest.raises(MocoError) as info:
        profile(model, torch.randn(1, 1, 32, 32), latency=False)
    message = str(info.value)
    assert "could not run on input shape (1, 1, 32, 32)" in message
    assert "mat1 and mat2 shapes cannot be multiplied" in message
    assert "\n" not in message and "Traceback" not in message


# ---------------------------------------------------------------- fused attention / recurrent kernels, TorchScript


def _fastpath(enabled: bool):
    class _Flag:
        def __enter__(self):
            self.old = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(enabled)

        def __exit__(self, *exc):
            torch.backends.mha.set_fastpath_enabled(self.old)

    return _Flag()


@pytest.mark.parametrize("norm_first,activation", [(False, "relu"), (True, "gelu")])
def test_transformer_encoder_layer_fused_kernel_counted_like_unfused(norm_first, activation):
    torch.manual_seed(0)
    b, length, e, hidden = 2, 10, 32, 64
    layer = nn.TransformerEncoderLayer(e, 4, hidden, batch_first=True, norm_first=norm_first, activation=activation)
    x = torch.randn(b, length, e)
    fused = profile(layer, x, latency=False)  # eval + no_grad: aten._transformer_encoder_layer_fwd
    with _fastpath(False):
        unfused = profile(layer, x, latency=False)
    # hand count: QKV projection, QK^T and AV (dense), output projection, feed-forward
    hand = b * length * e * 3 * e + 2 * b * length * length * e + b * length * e * e + 2 * b * length * e * hidden
    assert fused.totals.macs == unfused.totals.macs == hand == 176_640
    assert fused.totals.flops == unfused.totals.flops
    assert fused.unsupported_ops == {}


def test_multihead_attention_and_sdpa_counted():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(32, 4, batch_first=True)

        def forward(self, x, memory):
            return self.mha(x, memory, memory)[0]

    torch.manual_seed(0)
    model = Attention()
    x, memory = torch.randn(2, 10, 32), torch.randn(2, 6, 32)
    fused = profile(model, (x, memory), latency=False)
    with _fastpath(False):
        unfused = profile(model, (x, memory), latency=False)
    hand = 2 * 10 * 32 * 32 + 2 * (2 * 6 * 32 * 32) + 2 * (2 * 10 * 6 * 32) + 2 * 10 * 32 * 32  # q, k+v, QK^T+AV, out
    assert fused.totals.macs == unfused.totals.macs == hand
    assert fused.layer("mha").macs == hand

    class Sdpa(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = torch.randn(2, 4, 10, 8), torch.randn(2, 4, 10, 8), torch.randn(2, 4, 10, 16)
    p = profile(Sdpa(), (q, k, v), latency=False)
    assert p.totals.macs == 2 * 4 * 10 * 10 * (8 + 16)  # dense convention, causal or not
    assert p.unsupported_ops == {}
    assert p.totals.other_elementwise_flops >= 5 * 2 * 4 * 10 * 10  # softmax over every score


def test_lstm_and_gru_count_gate_products_per_step():
    class Recurrent(nn.Module):
        def __init__(self, cell):
            super().__init__()
            self.rnn = cell(16, 32, batch_first=True)
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            return self.fc(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)
    x = torch.randn(1, 16, 16)  # 16 steps, input 16, hidden 32
    lstm = Recurrent(nn.LSTM)
    fused = profile(lstm, x, latency=False)  # aten.mkldnn_rnn_layer
    assert fused.layer("rnn").macs == 4 * 16 * 32 * (16 + 32) == 98_304
    with torch.backends.mkldnn.flags(enabled=False):  # the unfused per-step path
        unfused = profile(lstm, x, latency=False)
    assert fused.layer("rnn").to_dict() == unfused.layer("rnn").to_dict()
    assert fused.unsupported_ops == unfused.unsupported_ops == {}
    gru = profile(Recurrent(nn.GRU), x, latency=False)
    assert gru.layer("rnn").macs == 3 * 16 * 32 * (16 + 32)
    two_layer = profile(nn.LSTM(16, 32, num_layers=2, bidirectional=True), torch.randn(5, 3, 16), latency=False)
    assert two_layer.totals.macs == 2 * 4 * 5 * 3 * 32 * (16 + 32) + 2 * 4 * 5 * 3 * 32 * (64 + 32)


def test_scripted_model_totals_exact_and_rows_said_unavailable():
    torch.manual_seed(0)
    model = create("seed_cnn").eval()
    x = torch.randn(1, 1, 28, 28)
    eager = profile(model, x, latency=False)
    scripted = profile(torch.jit.script(model), x, latency=False)
    assert scripted.totals.macs == eager.totals.macs and scripted.totals.flops == eager.totals.flops
    assert eager.attribution == "per module" and eager.bottleneck == "2"
    assert scripted.bottleneck is None
    assert "per-module rows unavailable" in scripted.attribution and scripted.attribution in scripted.to_text()
    assert scripted.to_dict()["attribution"] == scripted.attribution
    assert scripted.layer("2").type == "Conv2d"


def test_profile_without_latency_runs_the_model_once():
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)
            self.forwards = 0

        def forward(self, x):
            self.forwards += 1
            return self.fc(x)

    model = Counting()
    profile(model, torch.randn(3, 4), latency=False)
    assert model.forwards == 1
    model.forwards = 0
    profile(model, torch.randn(3, 4), repeats=3, warmup=1)
    assert model.forwards == 1 + 1 + 2 * 3  # counting pass, warm-up, hooked and un-hooked timed passes
