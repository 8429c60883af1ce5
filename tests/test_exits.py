"""moco.exits: batched early exits that really skip work, training modes, calibration, save/load, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from moco.errors import MocoError
from moco.exits import (
    Criterion, ExitOutputs, MaxProb, attach_exits, auto_points, calibrate, collect_outputs, evaluate_exits,
    load_exits, save_exits, simulate, tradeoff_curve, train_exits,
)


def tiny_seq(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),                 # 0, 1
        nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU(),       # 2, 3
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),       # 4, 5
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),  # 6, 7, 8
    ).eval()


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


class TinyRes(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block1 = Block(4)
        self.down = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.block2 = Block(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.block2(self.down(self.block1(torch.relu(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


X = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def net_for(model=None, points=(2, 4), seed_model=0, **kw):
    model = model if model is not None else tiny_seq(seed_model)
    return model, attach_exits(model, list(points), example_input=X[:1], **kw).eval()


# ------------------------------------------------------------------------------------- inference


def test_no_exit_equals_model_and_batch_edge_cases():
    model, net = net_for()
    with torch.no_grad():
        ref = model(X)
        out, idx = net(X)  # thresholds None: every exit disabled
        assert torch.equal(out, ref) and idx.tolist() == [2] * 16
        net.thresholds = [1.1, 1.1]  # max_prob can never reach 1.1: heads run, nobody exits
        net.criterion = MaxProb()
        out, idx = net(X)
        assert torch.allclose(out, ref) and (idx == 2).all()
        out1, idx1 = net(X[:1])  # batch of 1
        assert out1.shape == (1, 3) and idx1.tolist() == [2]
        out0, idx0 = net(X[:0])  # empty batch
        assert out0.shape == (0, 3) and idx0.shape == (0,) and idx0.dtype == torch.int64
        net.thresholds = [0.0, None]  # everybody exits at exit 0
        out, idx = net(X)
        assert (idx == 0).all() and torch.allclose(out, net.forward_all(X)[0])
        assert torch.equal(net.forward_final(X), ref)


def _count_batch(module, counter):
    return module.register_forward_pre_hook(lambda m, args: counter.append(args[0].shape[0]))


def test_no_work_after_exit():
    model, net = net_for(criterion="max_prob")
    with torch.no_grad():
        scores = net.criterion.score(net.forward_all(X)[0])
    t = float(scores.median())
    net.thresholds = [t, None]
    later, head1 = [], []
    hooks = [_count_batch(model[4], later), _count_batch(model[8], later), _count_batch(net.heads[1], head1)]
    try:
        with torch.no_grad():
            out, idx = net(X)
        stay = int((scores < t).sum())
        assert 0 < stay < 16
        assert later == [stay, stay]                 # later modules see only the samples that stayed
        assert head1 == []                           # a disabled exit computes nothing
        assert (idx == 0).sum() == 16 - stay
        full = net.forward_all(X)
        later.clear()
        leave = idx == 0
        assert torch.allclose(out[leave], full[0][leave]) and torch.allclose(out[~leave], full[2][~leave])
        net.thresholds = [0.0, 0.0]                  # all leave at exit 0: nothing later runs at all
        later.clear()
        head1.clear()
        with torch.no_grad():
            net(X)
        assert later == [] and head1 == []
    finally:
        for h in hooks:
            h.remove()


def test_simulation_matches_forward_and_fx_model_shares_parameters():
    model = TinyRes().eval()
    net = attach_exits(model, ["block1", "down"], example_input=X[:1], head="pool_linear", criterion="max_prob").eval()
    assert {id(p) for p in net.backbone_parameters()} == {id(p) for p in model.parameters()}
    with torch.no_grad():
        assert torch.allclose(net.forward_final(X), model(X))
        outs = collect_outputs(net, X)
        thr = [float(np.quantile(outs.scores[0], 0.6)), float(np.quantile(outs.scores[1], 0.5))]
        net.thresholds = thr
        _, idx = net(X)
    assert idx.tolist() == simulate(outs, thr, net.criterion).tolist()
    assert net.costs.full_macs > 0 and len(net.costs.head_macs) == 2


# ------------------------------------------------------------------------------------- training


def _blobs(n, seed, noise=1.0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    protos = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(99))
    scale = torch.rand(n, generator=g).view(-1, 1, 1, 1) * 2.0  # per-sample difficulty
    x = protos[y] * scale + noise * torch.randn(n, 1, 8, 8, generator=g)
    return x, y


def test_retrofit_leaves_backbone_and_final_predictions_unchanged():
    model, net = net_for()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    heads_before = [p.clone() for p in net.heads.parameters()]
    with torch.no_grad():
        ref = model(X)
    model.train()  # retrofit must not move BatchNorm-like state nor flip flags for good
    res = train_exits(net, _blobs(256, 0), mode="retrofit", epochs=2, batch_size=64, progress=False)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(X), ref)
    assert any(not torch.equal(a, b) for a, b in zip(heads_before, net.heads.parameters()))
    assert len(res.history) == 2 and len(res.history[0].train_accuracy) == 3


def test_joint_loss_weights_select_what_learns():
    model, net = net_for()
    tail = [p.clone() for p in model[4:].parameters()]
    head1 = [p.clone() for p in net.heads[1].parameters()]
    train_exits(net, _blobs(128, 1), mode="joint", weights=[1.0, 0.0, 0.0], epochs=1, batch_size=64, progress=False)
    # only exit 0's loss: the backbone after exit 0's point and the unused head get no gradient
    assert all(torch.equal(a, b) for a, b in zip(tail, model[4:].parameters()))
    assert all(torch.equal(a, b) for a, b in zip(head1, net.heads[1].parameters()))
    train_exits(net, _blobs(128, 1), weights=[0.0, 0.0, 1.0], epochs=1, batch_size=64, progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(tail, model[4:].parameters()))
    with pytest.raises(MocoError, match="3 exits"):
        train_exits(net, _blobs(64, 1), weights=[1.0, 0.3], progress=False)
    with pytest.raises(MocoError, match="mode"):
        train_exits(net, _blobs(64, 1), mode="both", progress=False)


def test_distillation_teaches_early_exits_the_final_exits_answers():
    # adversarial labels (never the final exit's class): plain CE (d=0) learns to disagree with the final
    # exit, pure distillation (d=1) ignores the labels and learns to agree with it
    x, y = _blobs(512, 5)
    agreement = {}
    for d in (0.0, 1.0):
        model, net = net_for(head="conv_pool_linear")  # a head strong enough to learn either answer
        train_exits(net, (x, y), weights=[0.0, 0.0, 1.0], epochs=5, batch_size=64, lr=1e-2, progress=False)
        model.eval()
        with torch.no_grad():
            final = model(x).argmax(1)
        assert torch.bincount(final, minlength=3).min() > 50  # a final exit that answers every class
        train_exits(net, (x, (final + 1) % 3), mode="retrofit", epochs=10, batch_size=64, lr=1e-2, distillation=d,
                    progress=False)
        net.eval()
        with torch.no_grad():
            agreement[d] = float((net.forward_all(x)[0].argmax(1) == final).float().mean())
    assert agreement[1.0] > 0.8 and agreement[0.0] < 0.3, agreement
    _, net = net_for()
    for bad in ({"distillation": 1.5}, {"distillation": -0.1}, {"temperature": 0.0}, {"distillation": "x"}):
        with pytest.raises(MocoError, match="distillation|temperature"):
            train_exits(net, _blobs(64, 1), progress=False, **bad)


def test_deeper_conv_head_shapes_macs_and_round_trip(tmp_path):
    from moco.exits import conv_pool_linear

    model, net = net_for(head=[conv_pool_linear(channels=4, depth=2), "conv_pool_linear"])
    head0 = net.heads[0]
    assert head0.more is not None and head0.fc.in_features == 8 * 2 * 2  # 4 channels, then 8
    shallow = net_for(head=[conv_pool_linear(channels=4), "conv_pool_linear"])[1]
    assert net.costs.head_macs[0] > shallow.costs.head_macs[0]
    train_exits(net, _blobs(128, 4), mode="retrofit", epochs=1, batch_size=64, progress=False)
    net.eval()
    save_exits(net, tmp_path / "deep")
    loaded = load_exits(model, tmp_path / "deep")
    with torch.no_grad():
        assert all(torch.allclose(a, b) for a, b in zip(net.forward_all(X), loaded.forward_all(X)))


def test_separable_head_is_cheaper_than_full_convs_and_round_trips(tmp_path):
    from moco.exits import conv_pool_linear, sep_conv_pool_linear

    model, net = net_for(head=[sep_conv_pool_linear(widths=[8, 16]), "pool_linear"])
    full = net_for(head=[conv_pool_linear(channels=8, depth=2), "pool_linear"])[1]
    assert net.heads[0].fc.in_features == 16 * 2 * 2
    assert 0 < net.costs.head_macs[0] < full.costs.head_macs[0]
    train_exits(net, _blobs(128, 4), mode="retrofit", epochs=1, batch_size=64, progress=False)
    net.eval()
    save_exits(net, tmp_path / "sep")
    loaded = load_exits(model, tmp_path / "sep")
    spec = loaded.head_specs[0]
    assert spec["type"] == "sep_conv_pool_linear" and list(spec["options"]["widths"]) == [8, 16]
    with torch.no_grad():
        assert all(torch.allclose(a, b) for a, b in zip(net.forward_all(X), loaded.forward_all(X)))
    with pytest.raises(MocoError, match="widths"):
        sep_conv_pool_linear(widths=[])
    with pytest.raises(MocoError, match="width"):
        sep_conv_pool_linear(widths=[8, 0])


# ------------------------------------------------------------------------------------- calibration


def _synthetic_outputs(n, seed):
    """3 exits; early exits right with probability rising with their max-prob score; final right 90%."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    final = np.where(rng.random(n) < 0.9, y, (y + 1) % 3)
    scores = rng.random((2, n))
    preds = []
    for i in range(2):
        right = rng.random(n) < 0.4 + 0.6 * scores[i] ** (0.5 + i)
        preds.append(np.where(right, y, (y + 2) % 3))
    return ExitOutputs(scores, np.stack([*preds, final]).astype(np.int64), y.astype(np.int64))


@pytest.mark.parametrize("metric", ["accuracy_drop", "disagreement"])
def test_calibration_meets_target_on_held_out_data(metric):
    _, net = net_for(criterion="max_prob", head="pool_linear")  # heads far cheaper than the segments they skip
    target = 0.03
    result = calibrate(net, _synthetic_outputs(4000, 0), target=target, metric=metric, progress=False)
    assert net.thresholds == result.thresholds and any(t is not None for t in result.thresholds)
    assert result.certified_bound <= target and result.measured_risk <= result.certified_bound
    assert result.expected_macs < result.full_macs
    fresh = _synthetic_outputs(200_000, 1)
    exit_at = simulate(fresh, result.thresholds, net.criterion)
    taken = fresh.predictions[exit_at, np.arange(fresh.n)]
    final = fresh.predictions[-1]
    if metric == "accuracy_drop":
        risk = np.mean((taken != fresh.labels) & (final == fresh.labels))
        assert np.mean(final == fresh.labels) - np.mean(taken == fresh.labels) <= target
    else:
        risk = np.mean(taken != final)
    assert risk <= target
    assert (exit_at < 2).mean() > 0.1  # it does let samples leave early


def test_calibrated_trained_network_keeps_accuracy_on_held_out_data():
    model, net = net_for(tiny_seq(3), criterion="entropy", head="pool_linear")
    train_exits(net, _blobs(1500, 10), epochs=4, batch_size=64, lr=3e-3, progress=False)
    result = calibrate(net, _blobs(1500, 11), target=0.03, progress=False)
    report = evaluate_exits(net, _blobs(3000, 12), batch_size=256)
    assert report.accuracy_final - report.accuracy <= 0.03
    assert sum(report.exit_counts) == 3000 and report.expected_macs <= report.full_macs
    assert "accuracy" in report.to_text() and result.certified_bound <= 0.03


def test_impossible_target_says_how_many_samples():
    _, net = net_for()
    with pytest.raises(MocoError, match=r"needs >= \d+ test samples.*at least \d+ samples"):
        calibrate(net, _synthetic_outputs(200, 0), target=0.001, progress=False)
    with pytest.raises(MocoError, match="needs labels"):
        calibrate(net, X, progress=False)
    with pytest.raises(MocoError, match="target"):
        calibrate(net, _synthetic_outputs(200, 0), target=1.5, progress=False)


def test_tradeoff_curve_and_plot(tmp_path):
    _, net = net_for(criterion="max_prob", head="pool_linear")
    curve = tradeoff_curve(net, _synthetic_outputs(500, 2), n_points=11)
    assert curve.points[0].expected_macs == pytest.approx(curve.full_macs)
    assert curve.points[-1].expected_macs < curve.full_macs
    png = curve.plot(tmp_path / "curve.png", mark=(curve.points[3].expected_macs, curve.points[3].accuracy))
    assert png.read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------- save / load


def test_save_load_round_trip(tmp_path):
    model, net = net_for(criterion="max_prob", head=["conv_pool_linear", "pool_linear"])
    train_exits(net, _blobs(128, 4), mode="retrofit", epochs=1, batch_size=64, progress=False)
    net.eval()
    with torch.no_grad():
        s = net.criterion.score(net.forward_all(X)[0])
    net.thresholds = [float(s.median()), 0.5]
    json_path, npz_path = save_exits(net, tmp_path / "exits")
    assert json_path.name == "exits.json" and npz_path.name == "exits.npz"
    loaded = load_exits(model, tmp_path / "exits")
    assert loaded.thresholds == net.thresholds and loaded.points == net.points
    assert isinstance(loaded.criterion, MaxProb)
    with torch.no_grad():
        a, ia = net(X)
        b, ib = loaded(X)
    assert torch.equal(ia, ib) and torch.allclose(a, b)
    with pytest.raises(MocoError, match="need both"):
        load_exits(model, tmp_path / "missing")
    wider = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 3)).eval()
    # torch's header line alone ("Error(s) in loading state_dict for ModuleList:") said nothing: the first mismatch
    with pytest.raises(MocoError, match=r"do not fit this model \(size mismatch for .*torch.Size.*\); load them onto"):
        load_exits(wider, tmp_path / "exits")


def test_custom_head_and_criterion_need_their_factory_to_load(tmp_path):
    class Margin(Criterion):
        name = "margin"

        def score(self, logits):
            top = logits.topk(2, dim=1).values
            return top[:, 0] - top[:, 1]

    def head(in_shape, num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(in_shape)), num_classes))

    model, net = net_for(head=head, criterion=Margin())
    net.thresholds = [1.0, None]
    save_exits(net, tmp_path / "custom")
    with pytest.raises(MocoError, match="custom head"):
        load_exits(model, tmp_path / "custom")
    with pytest.raises(MocoError, match="custom criterion"):
        load_exits(model, tmp_path / "custom", head=head)
    loaded = load_exits(model, tmp_path / "custom", head=head, criterion=Margin())
    with torch.no_grad():
        assert torch.equal(loaded(X)[1], net(X)[1])


# ------------------------------------------------------------------------------------- errors, points


def test_clear_errors():
    model = tiny_seq()
    with pytest.raises(MocoError, match=r"does not exist.*valid points are \['0', '1'"):
        attach_exits(model, ["conv9"], example_input=X[:1])
    with pytest.raises(MocoError, match="does not exist.*'block1'"):
        attach_exits(TinyRes(), ["blok1"], example_input=X[:1])
    with pytest.raises(MocoError, match=r"returns shape \(1, 5\).*\[N, 3\]"):
        attach_exits(model, [2], example_input=X[:1], head=lambda shape, c: nn.Sequential(nn.Flatten(), nn.LazyLinear(5)))
    with pytest.raises(MocoError, match="execution order"):
        attach_exits(model, [4, 2], example_input=X[:1])
    with pytest.raises(MocoError, match="execution order"):
        attach_exits(TinyRes(), ["down", "block1"], example_input=X[:1])
    with pytest.raises(MocoError, match="cannot put an exit after 'block1.conv1'"):
        attach_exits(TinyRes(), ["block1.conv1"], example_input=X[:1])
    with pytest.raises(MocoError, match="int exit point"):
        attach_exits(TinyRes(), [1], example_input=X[:1])
    _, net = net_for()
    with pytest.raises(MocoError, match="NaN"):
        net(torch.full((2, 1, 8, 8), float("nan")))
    with pytest.raises(MocoError, match="one value per early exit"):
        net.thresholds = [0.1]
    with pytest.raises(TypeError):
        net("not a tensor")


def test_auto_points_on_resnet18():
    from moco.models import create

    model = create("resnet18", in_channels=1, width_multiplier=0.125).eval()
    x = torch.zeros(1, 1, 16, 16)
    assert auto_points(model, x) == ["layer1", "layer2", "layer3"]
    pts = auto_points(model, x, strategy="macs", n=3)
    assert len(pts) >= 2 and pts == sorted(pts, key=["stem", "layer1", "layer2", "layer3", "layer4", "pool", "flatten"].index)
    net = attach_exits(model, pts, example_input=x)
    assert net.num_exits == len(pts) + 1


def test_benchmarks_are_registered():
    from moco.bench.registry import BENCHMARK_MODULES, list_benchmarks

    names = dict(list_benchmarks())
    for name in ("exits-fashion", "exits-mnist-retrofit"):
        assert name in BENCHMARK_MODULES and not names[name].startswith("(cannot be loaded")


def test_forward_rejects_wrong_dtype_and_shape():
    _, net = net_for()
    with pytest.raises(TypeError, match="dtype torch.int64"):
        net(torch.zeros(2, 1, 8, 8, dtype=torch.long))
    with pytest.raises(MocoError, match=r"per-sample shape \(1, 9, 8\).*\(1, 8, 8\)"):
        net(torch.zeros(2, 1, 9, 8))
    with pytest.raises(MocoError, match="per-sample shape"):
        net.forward_all(torch.zeros(2, 3, 8, 8))


def test_tampered_or_truncated_exits_artifacts_are_refused(tmp_path):
    import json

    model, net = net_for()
    net.thresholds = [0.5, None]
    json_path, npz_path = save_exits(net, tmp_path / "e")
    meta = json.loads(json_path.read_text())
    assert len(meta["weights_sha256"]) == 64
    good_npz = npz_path.read_bytes()

    def broken(**change):
        doc = {k: v for k, v in meta.items() if change.get(k, 0) is not None}
        doc.update({k: v for k, v in change.items() if v is not None})
        json_path.write_text(json.dumps(doc))
        return pytest.raises(MocoError, match=r"e\.json")

    with broken(points=None):  # missing key
        load_exits(model, tmp_path / "e")
    with broken(thresholds="0.5"):  # wrong type
        load_exits(model, tmp_path / "e")
    with broken(thresholds=[float("nan"), None]):
        load_exits(model, tmp_path / "e")
    with broken(thresholds=[1e300, None]):
        load_exits(model, tmp_path / "e")
    with broken(input_shape=[1, -8, 8]):
        load_exits(model, tmp_path / "e")
    json_path.write_text(json.dumps(meta))
    npz_path.write_bytes(good_npz[: len(good_npz) // 2])  # truncated
    with pytest.raises(MocoError, match=r"e\.npz.*checksum"):
        load_exits(model, tmp_path / "e")
    json_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "weights_sha256"}))
    with pytest.raises(MocoError, match=r"e\.npz.*truncated or damaged"):  # BadZipFile, named
        load_exits(model, tmp_path / "e")
    npz_path.write_bytes(good_npz)
    json_path.write_text(json.dumps(meta))
    assert load_exits(model, tmp_path / "e").thresholds == (0.5, None)


def test_a_misspelt_exit_point_suggests_valid_points_that_the_list_shows(constant_width_net):
    # the hint offered 'blocks.2' while the "valid points" list left it out (it ends where 'blocks' ends)
    import re

    with pytest.raises(MocoError) as err:
        attach_exits(constant_width_net, ["blocks.7"], example_input=torch.randn(1, 1, 12, 12))
    message = str(err.value)
    suggested = re.findall(r"'([^']+)'", message.split("did you mean")[1].split("?")[0])
    listed = re.findall(r"'([^']+)'", message.split("valid points are")[1])
    assert suggested and set(suggested) <= set(listed) and "blocks.2" in listed
