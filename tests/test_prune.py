"""Magnitude pruning: L1 importance, one-shot selection, the iterative prune-retrain loop, masks, fine-tuning."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from moco.compress.finetune import finetune
from moco.compress.prune import IterativePruner, PruneStep, l1_importance, masked_copy, select_one_shot
from moco.errors import MocoError
from moco.train import evaluate, fit


def _quadrant_data(n, seed):
    """4 classes: which quadrant of an 8x8 image has the largest mean (a task a tiny CNN learns in seconds)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    q = torch.stack([x[:, 0, :4, :4].mean((1, 2)), x[:, 0, :4, 4:].mean((1, 2)),
                     x[:, 0, 4:, :4].mean((1, 2)), x[:, 0, 4:, 4:].mean((1, 2))], 1)
    return x, q.argmax(1)


def _tiny_cnn():
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 16, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.fixture(scope="module")
def task():
    """A trained tiny CNN with its train / validation data."""
    torch.manual_seed(0)
    model = _tiny_cnn()
    train, val = _quadrant_data(2000, 0), _quadrant_data(500, 1)
    fit(model, train, epochs=5, lr=3e-3, progress=False, seed=0)
    return model.eval(), train, val


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, state):
    return all(torch.equal(state[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------ importance


def test_l1_importance_on_hand_set_layers():
    model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.Flatten(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].weight[0].fill_(1.0)          # 2 * 2 * 2 = 8 weights of 1
        model[0].weight[1, 0, 0, 0] = -3.0     # sign does not matter
        model[0].weight[2].fill_(-0.5)         # 8 * 0.5
        model[0].bias.fill_(100.0)             # bias is not counted
        model[2].weight.copy_(torch.tensor([[1.0, -2.0, 3.0], [0.0, 0.5, 0.0]]))
    imp = l1_importance(model)
    assert set(imp) == {"0", "2"}
    np.testing.assert_allclose(imp["0"], [8.0, 3.0, 4.0])
    np.testing.assert_allclose(imp["2"], [6.0, 0.5])
    assert imp["0"].dtype == np.float64
    assert set(l1_importance(model, "2")) == {"2"}


def test_l1_importance_errors_name_the_prunable_layers():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    with pytest.raises(MocoError, match="unknown layer 'conv9'.*'0'"):
        l1_importance(model, ["conv9"])
    with pytest.raises(MocoError, match="ReLU"):
        l1_importance(model, ["1"])
    with pytest.raises(TypeError):
        l1_importance("not a model")


# ------------------------------------------------------------------------------------ one-shot


def _set_l1(layer, values):
    """Give output unit i of ``layer`` an L1 norm of values[i] (spread evenly over its weights)."""
    with torch.no_grad():
        w = layer.weight
        per = w[0].numel()
        for i, v in enumerate(values):
            w[i].fill_(v / per)


def test_select_one_shot_per_layer_keeps_the_largest_l1_units():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 6), nn.ReLU(),
                          nn.Linear(6, 3))
    _set_l1(model[0], [5.0, 1.0, 3.0, 2.0])
    _set_l1(model[3], [1.0, 6.0, 2.0, 5.0, 3.0, 4.0])
    state = _state(model)
    keep = select_one_shot(model, 0.5, layers=["0", "3"])
    assert keep == {"0": [0, 2], "3": [1, 3, 5]}
    assert _same_state(model, state)
    # a ratio that rounds to nothing removes nothing; min_units is respected
    assert select_one_shot(model, 0.1, layers=["0"]) == {"0": [0, 1, 2, 3]}
    assert select_one_shot(model, 0.99, layers=["0"], min_units=2) == {"0": [0, 2]}


def test_select_one_shot_global_normalises_each_layer_by_its_mean_l1():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    _set_l1(model[0], [1.0, 2.0, 3.0, 10.0])      # / mean 4  -> 0.25, 0.5, 0.75, 2.5
    _set_l1(model[2], [30.0, 60.0, 90.0, 120.0])  # / mean 75 -> 0.4, 0.8, 1.2, 1.6
    keep = select_one_shot(model, 0.5, layers=["0", "2"], scope="global")
    assert keep == {"0": [3], "2": [1, 2, 3]}
    # raw L1 would have emptied layer 0; per-layer scope removes half of each
    assert select_one_shot(model, 0.5, layers=["0", "2"], scope="layer") == {"0": [2, 3], "2": [2, 3]}


def test_select_one_shot_errors():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
    with pytest.raises(MocoError, match=r"ratio .* \[0, 1\)"):
        select_one_shot(model, 1.0, layers=["0"])
    with pytest.raises(MocoError, match="ratio"):
        select_one_shot(model, -0.1, layers=["0"])
    with pytest.raises(MocoError, match="scope"):
        select_one_shot(model, 0.5, layers=["0"], scope="network")
    with pytest.raises(MocoError, match="unknown layer"):
        select_one_shot(model, 0.5, layers=["fc"])
    with pytest.raises(MocoError, match="example_input"):
        select_one_shot(model, 0.5)


# ------------------------------------------------------------------------------------ masks


def test_masked_copy_zeroes_pruned_units_and_leaves_the_model_alone(task):
    model, (x, _), _ = task
    state = _state(model)
    masked = masked_copy(model, {"0": [1, 2, 3, 4, 5, 6, 7], "5": list(range(8))})
    assert _same_state(model, state)
    assert torch.all(masked[0].weight[0] == 0) and masked[0].bias[0] == 0
    assert torch.all(masked[5].weight[8:] == 0) and torch.all(masked[5].bias[8:] == 0)
    assert torch.equal(masked[0].weight[1:], model[0].weight[1:])
    with torch.no_grad():
        assert torch.all(masked[:2](x[:50])[:, 0] == 0)       # the pruned channel outputs exactly zero
    with pytest.raises(MocoError, match="outside"):
        masked_copy(model, {"0": [0, 8]})
    with pytest.raises(MocoError, match="twice"):
        masked_copy(model, {"0": [1, 1]})
    with pytest.raises(MocoError, match="empty"):
        masked_copy(model, {"0": []})


def test_finetune_with_keep_holds_pruned_weights_at_zero(task):
    model, train, _ = task
    keep = {"0": [0, 2, 4, 6], "2": [1, 3, 5, 7], "5": list(range(0, 16, 2))}
    masked = masked_copy(model, keep)
    before = _state(masked)
    finetune(masked, train, epochs=1, lr=1e-2, optimizer="sgd", weight_decay=1e-3, keep=keep, progress=False)
    for name, kept in keep.items():
        layer = dict(masked.named_modules())[name]
        dead = [i for i in range(layer.weight.shape[0]) if i not in kept]
        assert torch.all(layer.weight[dead] == 0) and torch.all(layer.bias[dead] == 0)
        assert not torch.equal(layer.weight[kept], before[f"{name}.weight"][kept])  # the live units trained
    # no gradient hook is left behind on the model
    assert all(not p._backward_hooks for p in masked.parameters())


# ------------------------------------------------------------------------------------ finetune


def test_finetune_repairs_a_damaged_model(task):
    model, train, val = task
    damaged = copy.deepcopy(model)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in damaged.parameters():
            p.add_(0.4 * p.abs().mean() * torch.randn(p.shape, generator=g))
    acc_damaged = evaluate(damaged, val).accuracy
    result = finetune(damaged, train, epochs=2, lr=3e-3, seed=0, val_data=val, progress=False)
    assert len(result.history) == 2 and result.history[-1].val_accuracy is not None
    assert evaluate(damaged, val).accuracy > acc_damaged + 0.05


def test_finetune_errors(task):
    model, train, _ = task
    with pytest.raises(MocoError, match="empty"):
        finetune(copy.deepcopy(model), (train[0][:0], train[1][:0]), progress=False)
    with pytest.raises(MocoError, match="epochs"):
        finetune(copy.deepcopy(model), train, epochs=0, progress=False)
    with pytest.raises(TypeError):
        finetune(None, train)


# ------------------------------------------------------------------------------------ iterative


@pytest.fixture(scope="module")
def pruned(task):
    model, train, val = task
    state = _state(model)
    pruner = IterativePruner(["0", "2", "5"], drop_threshold=0.02, retrain_samples=1000, seed=0,
                             progress=False).fit(model, train, val)
    return model, state, pruner, val


def test_iterative_pruner_never_modifies_the_users_model(pruned):
    model, state, pruner, _ = pruned
    assert _same_state(model, state)
    assert pruner.model_ is not model


def test_iterative_pruner_stops_at_the_threshold_and_rolls_back(pruned):
    model, _, pruner, val = pruned
    log = pruner.log_
    assert log and all(isinstance(s, PruneStep) for s in log)
    assert pruner.base_accuracy_ == pytest.approx(evaluate(model, val).accuracy)
    for s in log:
        assert s.accepted == (s.drop_points <= 2.0 + 1e-9)
        assert s.drop_points == pytest.approx(100 * (pruner.base_accuracy_ - s.accuracy_retrained))
        if not s.accepted:
            assert s.units_after == s.units_before
    # each layer ends on a rolled-back step of one unit or at min_units
    for layer in ("0", "2", "5"):
        steps = [s for s in log if s.layer == layer]
        last = steps[-1]
        assert (not last.accepted and len(last.removed) == 1) or last.units_after == 1
    # a rolled-back step left no trace: the model's accuracy is that of the last accepted step
    assert any(not s.accepted for s in log)
    assert evaluate(pruner.model_, val).accuracy == pytest.approx(pruner.accuracy_)
    assert pruner.base_accuracy_ - pruner.accuracy_ <= 0.02 + 1e-9
    # the kept units match the log and the pruned ones are exactly zero
    for layer, kept in pruner.keep_.items():
        removed = {u for s in log if s.layer == layer and s.accepted for u in s.removed}
        n = pruner.units_[layer]
        assert sorted(set(range(n)) - removed) == kept
        w = dict(pruner.model_.named_modules())[layer].weight
        assert torch.all(w[sorted(removed)] == 0)
    assert len(pruner.history_) == sum(s.accepted for s in log)
    df = pruner.to_dataframe()
    assert list(df.index) == [s.step for s in log] and "drop_points" in df.columns
    assert pruner.summary()["units_after"] == {k: len(v) for k, v in pruner.keep_.items()}


def test_iterative_pruner_zero_threshold_rejects_every_harmful_step(task):
    model, train, val = task
    pruner = IterativePruner(["5"], drop_threshold=0.0, step=8, retrain_samples=200, max_steps=3, seed=1,
                             progress=False).fit(model, train, val)
    assert len(pruner.log_) <= 3
    for s in pruner.log_:
        assert s.accepted == (s.accuracy_retrained >= pruner.base_accuracy_)


def test_iterative_pruner_errors(task):
    model, train, val = task
    with pytest.raises(MocoError, match="drop_threshold"):
        IterativePruner(["0"], drop_threshold=-0.01).fit(model, train, val)
    with pytest.raises(MocoError, match="unknown layer"):
        IterativePruner(["conv1"]).fit(model, train, val)
    with pytest.raises(MocoError, match="layers is empty"):
        IterativePruner([]).fit(model, train, val)
    with pytest.raises(MocoError, match="step"):
        IterativePruner(["0"], step=1.5).fit(model, train, val)
    with pytest.raises(MocoError, match="step"):
        IterativePruner(["0"], step=0).fit(model, train, val)
    with pytest.raises(MocoError, match="val_data is empty"):
        IterativePruner(["0"]).fit(model, train, (val[0][:0], val[1][:0]))
    with pytest.raises(MocoError, match="train_data is empty"):
        IterativePruner(["0"]).fit(model, (train[0][:0], train[1][:0]), val)
    with pytest.raises(MocoError, match="no labels"):
        IterativePruner(["0"]).fit(model, train[0], val)
    with pytest.raises(MocoError, match="before to_dataframe"):
        IterativePruner(["0"]).to_dataframe()


# ------------------------------------------------------------------------------------ with surgery


def test_surgery_of_the_pruned_model_computes_the_same_function(pruned):
    surgery = pytest.importorskip("moco.compress.surgery")
    from moco.compress.prune import masked_equivalent

    _, _, pruner, (x, _) = pruned
    small = surgery.apply(pruner.model_, pruner.keep_, example_input=x[:1])
    assert small[0].out_channels == len(pruner.keep_["0"])
    assert small[5].out_features == len(pruner.keep_["5"])
    with torch.no_grad():
        torch.testing.assert_close(small(x[:64]), pruner.model_(x[:64]), atol=1e-5, rtol=1e-5)
    # the zero-masked twin, rebuilt from the small model, computes the same function at full size
    twin = masked_equivalent(pruner.model_, small, pruner.keep_, example_input=x[:8])
    assert twin[0].out_channels == 8
    with torch.no_grad():
        torch.testing.assert_close(twin(x[:64]), small(x[:64]), atol=1e-5, rtol=1e-5)


def test_iterative_pruner_with_surgery_per_step_matches_the_masked_loop(task):
    pytest.importorskip("moco.compress.surgery")
    model, train, val = task
    state = _state(model)
    kw = dict(drop_threshold=0.02, retrain_samples=500, seed=0, max_steps=4, progress=False)
    masked = IterativePruner(["0", "5"], **kw).fit(model, train, val)
    physical = IterativePruner(["0", "5"], example_input=val[0][:1], **kw).fit(model, train, val)
    assert _same_state(model, state)
    # the same decisions: same units removed, same accuracies (up to float summation order)
    assert [s.removed for s in physical.log_] == [s.removed for s in masked.log_]
    assert [s.accepted for s in physical.log_] == [s.accepted for s in masked.log_]
    for a, b in zip(physical.log_, masked.log_):
        assert a.accuracy_retrained == pytest.approx(b.accuracy_retrained, abs=0.01)
    assert physical.keep_ == masked.keep_
    small = physical.small_
    assert small[0].out_channels == len(physical.keep_["0"]) and small[5].out_features == len(physical.keep_["5"])
    with torch.no_grad():
        torch.testing.assert_close(physical.model_(val[0][:64]), small(val[0][:64]), atol=1e-5, rtol=1e-5)
    assert masked.small_ is None


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(1, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(4, 4, 3, padding=1)
        self.shortcut = nn.Conv2d(1, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        out = self.conv_b(torch.relu(self.conv_a(x))) + self.shortcut(x)
        return self.fc(torch.relu(out).mean((2, 3)))


def test_select_one_shot_with_example_input_prunes_tied_layers_together():
    pytest.importorskip("moco.compress.surgery")
    torch.manual_seed(0)
    model = _Residual()
    _set_l1(model.conv_b, [1.0, 9.0, 2.0, 8.0])      # conv_b and the shortcut feed one add: tied
    _set_l1(model.shortcut, [1.0, 8.0, 9.0, 2.0])
    x = torch.randn(2, 1, 6, 6)
    keep = select_one_shot(model, 0.5, example_input=x)
    assert set(keep) == {"conv_a", "conv_b", "shortcut"}          # the output layer fc is not prunable
    assert keep["conv_b"] == keep["shortcut"] == [1, 2]   # mean normalised L1: [.2, 1.7, 1.1, 1.0]
    assert len(keep["conv_a"]) == 2
    with pytest.raises(MocoError, match="output"):
        select_one_shot(model, 0.5, layers=["fc"], example_input=x)


def test_recalibrate_batchnorm_restores_statistics_without_touching_weights():
    from moco.compress.finetune import recalibrate_batchnorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)).eval()
    x = torch.randn(300, 1, 8, 8) * 2 + 1
    model[1].running_mean.fill_(100.0)  # stale statistics, as after surgery upstream
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    used = recalibrate_batchnorm(model, x, batch_size=100, max_samples=None)
    assert used == 300 and not model.training and not model[1].training and model[1].momentum == 0.1
    with torch.no_grad():
        h = model[0](x)
    assert torch.allclose(model[1].running_mean, h.mean((0, 2, 3)), atol=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert recalibrate_batchnorm(model, (x, torch.zeros(300, dtype=torch.long)), max_samples=50) == 50
    assert recalibrate_batchnorm(nn.Linear(2, 2), x) == 0  # no BatchNorm: nothing to do
    with pytest.raises(MocoError, match="no samples"):
        recalibrate_batchnorm(model, x[:0])


# ---------------------------------------------------------------------------------- group importance
def _consumer_model():
    """conv0 (4 filters of equal L1) -> BN -> ReLU -> conv2 that reads channel 3 with large weights."""
    model = nn.Sequential(nn.Conv2d(1, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1, bias=False),
                          nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).eval()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[3].weight.fill_(0.1)
        model[3].weight[:, 3] = 10.0
        model[1].weight.copy_(torch.tensor([0.5, 3.0, 0.5, 0.5]))
    return model


def test_group_importance_sums_producers_consumers_and_batchnorm():
    from moco.compress.prune import group_importance

    model = _consumer_model()
    x = torch.randn(2, 1, 4, 4)
    l1 = select_one_shot(model, 0.75, layers=["0"], example_input=x)  # equal filter L1: ties, lowest index removed
    assert l1["0"] == [3]
    assert select_one_shot(model, 0.75, layers=["0"], example_input=x, importance="bn_scale")["0"] == [1]
    group = select_one_shot(model, 0.75, layers=["0"], example_input=x, importance="group_l1")["0"]
    assert group == [3]  # the consumer's large column wins over BN's scale 3 (normalised per layer)
    scores = group_importance(model, x, "group_l2")
    assert set(scores) == {"0", "3"}  # the output layer 5 is not prunable
    # hand count for unit 3 of group "0": producer 1/1 + BN 0.25/(mean of [.25, 9, .25, .25]) + consumer
    bn = np.array([0.25, 9.0, 0.25, 0.25])
    cons = np.array([0.02, 0.02, 0.02, 200.0])
    hand = 1.0 + bn / bn.mean() + cons / cons.mean()
    np.testing.assert_allclose(scores["0"], hand, rtol=1e-9)
    with pytest.raises(MocoError, match="pass example_input"):
        select_one_shot(model, 0.5, layers=["0"], importance="group_l1")
    with pytest.raises(MocoError, match="importance must be one of"):
        select_one_shot(model, 0.5, layers=["0"], example_input=x, importance="taylor")


def test_group_importance_on_a_user_se_resnet_keeps_groups_consistent():
    from test_user_models import SEResNet, seeded

    from moco.compress.surgery import apply

    model = seeded(SEResNet())
    x = torch.randn(2, 1, 28, 28)
    for criterion in ("group_l1", "group_l2", "bn_scale"):
        keep = select_one_shot(model, 0.5, example_input=x, importance=criterion)
        assert keep["conv"] == keep["block1.conv2"] == keep["block1.se.fc2"]
        assert apply(model, keep, x)(x).shape == (2, 10)


def test_pruner_result_protocol():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 1, 8, 8, generator=g), torch.randint(0, 3, (60,), generator=g)
    pruner = IterativePruner(["0"], drop_threshold=0.5, step=0.5, retrain_samples=30, progress=False)
    assert "unfitted" in str(pruner)
    pruner.fit(model, (x, y), (x, y))
    text = pruner.to_text()
    assert str(pruner) == text and "accuracy_retrained" in text and "steps accepted" in text
    import json

    d = json.loads(json.dumps(pruner.to_dict()))
    assert d["keep"] == {k: list(v) for k, v in pruner.keep_.items()} and len(d["log"]) == len(pruner.log_)
    assert pruner.to_frame().equals(pruner.to_dataframe())


def test_compare_importance_same_macs_same_finetuning():
    from test_user_models import SEResNet

    from moco.compress.prune import compare_importance

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(120, 1, 16, 16, generator=g), torch.randint(0, 10, (120,), generator=g)
    model = SEResNet(width=8).eval()
    result = compare_importance(model, (x, y), (x, y), example_input=x[:1], macs_reduction=1.5,
                                criteria=("l1", "bn_scale"), finetune_samples=60, batch_size=32)
    assert [r.criterion for r in result.rows] == ["l1", "bn_scale"]
    assert all(r.macs_reduction >= 1.5 for r in result.rows)
    assert result.rows[0].macs_reduction == pytest.approx(result.rows[1].macs_reduction)  # equal budgets
    assert 0 < result.ratio < 0.95 and result.best in ("l1", "bn_scale")
    import json

    json.dumps(result.to_dict())
    assert str(result) == result.to_text() and "best:" in result.to_text()


def test_iterative_pruner_round_to_leaves_multiples(task):
    """round_to: every step leaves a multiple (raising the step as needed); a layer at one multiple is done."""
    model, train, val = task
    pruner = IterativePruner(["5"], drop_threshold=0.5, step=1, retrain_samples=100, max_steps=6, seed=0, round_to=4,
                             example_input=val[0][:1], progress=False).fit(model, train, val)
    assert all(s.units_after % 4 == 0 and s.units_before - s.units_after in (0, 4) for s in pruner.log_)
    assert [s.units_after for s in pruner.log_ if s.accepted] == [12, 8, 4]  # 16 -> 12 -> 8 -> 4, then done
    assert len(pruner.keep_["5"]) == 4 and len(pruner.log_) == 3
    # a width that is not a multiple: the first step goes down to the multiple below (12 -> 8, not 12 -> 11)
    def step(live, n, **kw):
        p = IterativePruner(["5"], **kw)
        p._check_params()
        return p._rounded_n(live, n)

    assert step(12, 1, round_to=8) == 4
    assert step(24, 1, round_to=8, min_units=9) == 8  # keeps 16, the smallest multiple >= 9
    assert step(8, 1, round_to=8) == 0  # one multiple left: the layer is done
    assert step(12, 3, round_to=None) == 3
    assert step(40, 3, round_to="auto") == 8  # 37 left -> 32 with a block of 8 or 16
    with pytest.raises(MocoError, match="round_to must be"):
        IterativePruner(["5"], round_to=-8).fit(model, train, val)


def test_iterative_pruner_with_a_layernorm_after_the_pruned_layer_returns_the_smaller_model():
    # zeroed outputs of fc would enter the LayerNorm's mean and variance: no zero-masked model is the smaller one,
    # so model_ is None (with a warning) and small_, which was evaluated and retrained at every step, is the result
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 16), nn.LayerNorm(16),
                          nn.ReLU(), nn.Linear(16, 4))
    train, val = _quadrant_data(600, 0), _quadrant_data(200, 1)
    fit(model, train, epochs=2, lr=3e-3, progress=False, seed=0)
    with pytest.warns(UserWarning, match="no zero-masked twin"):
        pruner = IterativePruner(["3"], drop_threshold=0.99, step=4, retrain_samples=200, max_steps=1, seed=0,
                                 example_input=val[0][:2], progress=False).fit(model.eval(), train, val)
    assert pruner.model_ is None
    assert pruner.small_[3].out_features == 12 and pruner.small_[4].normalized_shape == (12,)
    assert evaluate(pruner.small_, val).accuracy == pytest.approx(pruner.accuracy_, abs=1e-9)


class _CatDepthwise(nn.Module):
    """Inception-style branches of 4, 4 and 2 channels concatenated, then a depthwise conv over the 10."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.b1, self.b2, self.b3 = nn.Conv2d(6, 4, 1), nn.Conv2d(6, 4, 3, padding=1), nn.Conv2d(6, 2, 1)
        self.bn = nn.BatchNorm2d(10)
        self.dw = nn.Conv2d(10, 10, 3, padding=1, groups=10)
        self.fc = nn.Linear(10, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bn(torch.cat([self.b1(x), self.b2(x), self.b3(x)], dim=1)))
        return self.fc(torch.relu(self.dw(x)).mean((2, 3)))


def test_select_one_shot_prunes_the_branches_of_a_concat_with_the_depthwise_conv_reading_it():
    # the depthwise conv's 10 channels are the 4 + 4 + 2 of the branches: one removed group unit is a
    # different index in each layer (it used to fail: "tied layers have different unit counts [10, 4, 4, 2]")
    torch.manual_seed(0)
    model = _CatDepthwise().eval()
    _set_l1(model.dw, [5.0, 1.0, 5.0, 5.0, 5.0, 5.0, 1.0, 5.0, 1.0, 5.0])   # group units 1, 6, 8 the weakest
    for branch in (model.b1, model.b2, model.b3):
        _set_l1(branch, [1.0] * branch.out_channels)
    x = torch.randn(2, 1, 8, 8)
    keep = select_one_shot(model, 0.3, example_input=x)
    assert keep["dw"] == [0, 2, 3, 4, 5, 7, 9]
    assert keep["b1"] == [0, 2, 3] and keep["b2"] == [0, 1, 3] and keep["b3"] == [1]   # 6 -> b2's 2, 8 -> b3's 0
    from moco.compress.surgery import apply

    small = apply(model, keep, x)
    assert (small.b1.out_channels, small.b2.out_channels, small.b3.out_channels, small.dw.out_channels) == (3, 3, 1, 7)
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked_copy(model, keep)(x), atol=1e-5, rtol=1e-5)
    # every tied layer keeps min_units of its own, even a branch whose units are all among the weakest
    _set_l1(model.dw, [5.0] * 8 + [0.1, 0.1])
    keep = select_one_shot(model, 0.5, example_input=x, min_units=1)
    assert len(keep["b3"]) == 1 and len(keep["dw"]) == 5
    for criterion in ("group_l1", "bn_scale"):
        k = select_one_shot(model, 0.5, example_input=x, importance=criterion)
        assert len(k["dw"]) == sum(len(k[b]) for b in ("b1", "b2", "b3")) == 5
        apply(model, k, x)


def test_iterative_pruner_prunes_a_concat_group_in_each_layers_own_indices():
    torch.manual_seed(0)
    model = _CatDepthwise()
    train, val = _quadrant_data(400, 0), _quadrant_data(200, 1)
    fit(model, train, epochs=2, lr=3e-3, progress=False, seed=0)
    model.eval()
    pruner = IterativePruner(["b1"], drop_threshold=0.99, step=0.5, retrain_samples=100, max_steps=2, seed=0,
                             example_input=val[0][:2], progress=False).fit(model, train, val)
    keep, small = pruner.keep_, pruner.small_
    assert set(keep) == {"dw", "b1", "b2", "b3"}   # naming one member prunes its whole group
    assert pruner.log_[0].layer == "dw+b1+b2+b3" and pruner.log_[0].units_before == 10
    assert len(keep["dw"]) == sum(len(keep[b]) for b in ("b1", "b2", "b3")) < 10
    assert all(len(keep[b]) >= 1 for b in ("b1", "b2", "b3"))
    assert small.dw.out_channels == len(keep["dw"]) and small.b3.out_channels == len(keep["b3"])
    with torch.no_grad():
        torch.testing.assert_close(pruner.model_(val[0][:32]), small(val[0][:32]), atol=1e-5, rtol=1e-5)


class _CatWithInput(nn.Module):
    """A conv's 4 channels concatenated with the 1-channel input, then a depthwise conv over the 5."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.dw = nn.Conv2d(5, 5, 3, padding=1, groups=5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(self.dw(torch.cat([self.a(x), x], 1)).mean((2, 3)))


def test_units_tied_to_the_model_input_are_never_chosen():
    # the depthwise conv's channel 4 is the input image: it cannot be removed, even when it scores lowest
    # (the selection chose it and surgery refused: "cannot remove unit 4 of layer 'dw' ... tied to the model input")
    from moco.compress.surgery import apply

    torch.manual_seed(0)
    model = _CatWithInput().eval()
    _set_l1(model.dw, [3.0, 1.0, 2.0, 4.0, 0.1])
    _set_l1(model.a, [1.0] * 4)
    x = torch.randn(2, 1, 8, 8)
    for scope in ("layer", "global"):
        keep = select_one_shot(model, 0.4, example_input=x, scope=scope)
        assert keep["dw"] == [0, 3, 4] and keep["a"] == [0, 3]   # 4 skipped: 1 and 2 are the lowest that can go
        apply(model, keep, x)
    train, val = _quadrant_data(200, 0), _quadrant_data(100, 1)
    train = (train[0][:, :, :8, :8], train[1] % 3)
    val = (val[0][:, :, :8, :8], val[1] % 3)
    pruner = IterativePruner(["dw"], drop_threshold=0.99, step=0.5, retrain_samples=50, max_steps=4, seed=0,
                             example_input=x, progress=False).fit(model, train, val)
    assert 4 in pruner.keep_["dw"] and len(pruner.keep_["a"]) >= 1
