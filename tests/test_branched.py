"""BranchedNetwork, expected_macs and suggest_layer: exit semantics, no tail work after exit, costs."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from moco.errors import MocoError
from moco.models import create
from moco.profile import profile
from moco.rules.branched import (
    BranchedNetwork,
    CostEstimate,
    LayerCandidate,
    LayerSuggestion,
    expected_macs,
    suggest_layer,
)

SEED_D = 32 * 26 * 26  # seed_cnn after index 2 (conv1 + ReLU)


class ThresholdRule:
    """Duck-typed rule: exits where feature ``index`` > ``threshold``, always with class ``cls``."""

    def __init__(self, n_features, threshold, cls=3, num_classes=10, layer=None, index=0):
        self.n_features = n_features
        self.num_classes = num_classes
        self.layer = layer
        self.threshold = threshold
        self.cls = cls
        self.index = index
        self.calls = 0

    def assign(self, features):
        assert features.dtype == torch.float32 and features.shape[1] == self.n_features
        self.calls += 1
        mask = features[:, self.index] > self.threshold
        return mask, torch.full((len(features),), self.cls, dtype=torch.long)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def median_threshold(seed_cnn, x) -> float:
    with torch.no_grad():
        h = seed_cnn[:2](x).flatten(1)
    return float(h[:, 0].median())


def _tail_sizes(net: BranchedNetwork) -> tuple[list[int], object]:
    sizes: list[int] = []
    handle = net.tail.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    return sizes, handle


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------- semantics


def test_mask_semantics_and_exact_rows(seed_cnn, x, median_threshold):
    before = _state(seed_cnn)
    rule = ThresholdRule(SEED_D, median_threshold, cls=7)
    net = BranchedNetwork(seed_cnn, 2, rule).eval()
    with torch.no_grad():
        preds, mask = net(x)
        full = seed_cnn(x)
        expected_mask = seed_cnn[:2](x).flatten(1)[:, 0] > median_threshold
    assert mask.dtype == torch.bool and torch.equal(mask, expected_mask)
    assert 0 < int(mask.sum()) < len(x)
    assert preds.shape == (64, 10) and preds.dtype == full.dtype
    onehot = torch.zeros(int(mask.sum()), 10)
    onehot[:, 7] = 1
    assert torch.equal(preds[mask], onehot)
    assert torch.equal(preds.argmax(1)[mask], torch.full((int(mask.sum()),), 7))
    assert torch.equal(preds[~mask], full[~mask])
    assert net.head is not None and net.tail is not None and net.rule is rule and net.layer == 2
    assert net.point == "1"
    assert "rule" not in dict(net.named_children())
    # the model is not modified: same weights, same modules, no hooks left
    after = seed_cnn.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in seed_cnn.modules())


def test_classes_output(seed_cnn, x, median_threshold):
    net = BranchedNetwork(seed_cnn, 2, ThresholdRule(SEED_D, median_threshold, cls=4), output="classes")
    with torch.no_grad():
        preds, mask = net(x)
        full = seed_cnn(x).argmax(1)
    assert preds.dtype == torch.long and preds.shape == (64,)
    assert torch.all(preds[mask] == 4) and torch.equal(preds[~mask], full[~mask])


def test_no_tail_work_for_exited_samples(seed_cnn, x, median_threshold):
    net = BranchedNetwork(seed_cnn, 2, ThresholdRule(SEED_D, median_threshold))
    sizes, handle = _tail_sizes(net)
    try:
        with torch.no_grad():
            _, mask = net(x)
            assert sizes == [int((~mask).sum())]

            sizes.clear()
            all_exit = BranchedNetwork(seed_cnn, 2, ThresholdRule(SEED_D, -math.inf, cls=2))
            all_exit.tail = net.tail  # same tail module, same hook
            preds, mask = all_exit(x)
            assert sizes == [] and bool(mask.all())
            assert torch.equal(preds.argmax(1), torch.full((64,), 2)) and preds.dtype == torch.float32

            none_exit = BranchedNetwork(seed_cnn, 2, ThresholdRule(SEED_D, math.inf))
            none_exit.tail = net.tail
            preds, mask = none_exit(x)
            assert sizes == [64] and not bool(mask.any())
            assert torch.equal(preds, seed_cnn(x))
    finally:
        handle.remove()


def test_batch_of_one_and_empty_batch(seed_cnn, x):
    one = x[:1]
    with torch.no_grad():
        full = seed_cnn(one)
        exit_net = BranchedNetwork(seed_cnn, 2, ThresholdRule(SEED_D, -math.inf, cls=9))
        preds, mask = exit_net(one)
        assert preds.shape == (1, 10) and mask.tolist() == [True] and preds.argmax(1).item() == 9
        stay_net = BranchedNetwork(seed_cnn, 2, ThresholdRule(SEED_D, math.inf))
        preds, mask = stay_net(one)
        assert mask.tolist() == [False] and torch.equal(preds, full)
        for net in (exit_net, stay_net):
            preds, mask = net(x[:0])
            assert preds.shape == (0, 10) and mask.shape == (0,) and mask.dtype == torch.bool


def test_resnet_split_by_name():
    torch.manual_seed(0)
    model = create("resnet18", in_channels=1, width_multiplier=0.25).eval()
    xr = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    d = 16 * 28 * 28
    with torch.no_grad():
        probe = BranchedNetwork(model, "layer1", ThresholdRule(d, math.inf, layer="layer1"))
        h = probe.head(xr).flatten(1)
        threshold = float(h[:, 5].median())
        net = BranchedNetwork(model, rule=ThresholdRule(d, threshold, cls=1, layer="layer1", index=5))
        assert net.layer == "layer1"  # taken from rule.layer
        preds, mask = net(xr)
        full = model(xr)
    assert 0 < int(mask.sum()) < len(xr)
    assert torch.equal(preds[~mask], full[~mask])
    assert torch.all(preds[mask].argmax(1) == 1)


# ---------------------------------------------------------------------------- errors


def test_feature_count_mismatch(seed_cnn, x):
    net = BranchedNetwork(seed_cnn, 2, ThresholdRule(100, 0.0))
    with pytest.raises(MocoError, match=r"rule expects 100 features but layer 2 gives 21632 \(shape \(32, 26, 26\)"):
        net(x[:2])


def test_rule_layer_mismatch(seed_cnn):
    with pytest.raises(MocoError, match=r"fitted at layer 4 .* splits at layer 2"):
        BranchedNetwork(seed_cnn, 2, ThresholdRule(SEED_D, 0.0, layer=4))
    # the same split named two ways is accepted
    assert BranchedNetwork(seed_cnn, 2, ThresholdRule(SEED_D, 0.0, layer="1")).layer == 2


def test_unsplittable_layer_and_bad_rules(seed_cnn):
    model = create("resnet18", in_channels=1, width_multiplier=0.25).eval()
    with pytest.raises(MocoError, match="layer1.0.conv1"):
        BranchedNetwork(model, "layer1.0.conv1", ThresholdRule(10, 0.0))
    with pytest.raises(TypeError, match="rule is required"):
        BranchedNetwork(seed_cnn, 2)
    with pytest.raises(TypeError, match="assign"):
        BranchedNetwork(seed_cnn, 2, object())
    with pytest.raises(MocoError, match="output"):
        BranchedNetwork(seed_cnn, 2, ThresholdRule(SEED_D, 0.0), output="probs")
    bad_class = BranchedNetwork(seed_cnn, 2, ThresholdRule(SEED_D, -math.inf, cls=12))
    with pytest.raises(MocoError, match="outside 0..9"), torch.no_grad():
        bad_class(torch.zeros(2, 1, 28, 28))
    # a rule may know fewer classes than the model outputs (its data never showed the top ones), not more:
    # refused when the network is built (issue 12), from the last Linear or from example_input
    with pytest.raises(MocoError, match="only 10 outputs"):
        BranchedNetwork(seed_cnn, 2, ThresholdRule(SEED_D, math.inf, num_classes=12))
    with pytest.raises(MocoError, match="only 10 outputs"):
        BranchedNetwork(seed_cnn, 2, ThresholdRule(SEED_D, math.inf, num_classes=12),
                        example_input=torch.zeros(1, 1, 28, 28))


# ---------------------------------------------------------------------------- costs


def test_expected_macs_seed_cnn(seed_cnn):
    example = torch.zeros(1, 1, 28, 28)
    zero = expected_macs(seed_cnn, 2, 0.0, example_input=example)
    assert isinstance(zero, CostEstimate)
    assert zero.head_macs == 194_688  # conv1: 1*3*3*32*26*26
    assert zero.tail_macs == 10_616_832 + 1_179_648 + 1_280  # conv2 + fc1 + fc2
    assert zero.full_macs == profile(seed_cnn, example, latency=False).totals.macs == 11_992_448
    assert zero.features == SEED_D and zero.num_classes == 10 and zero.rule_macs == SEED_D * 10
    assert zero.ratio > 1 and zero.expected_macs == zero.full_macs + zero.rule_macs
    one = expected_macs(seed_cnn, 2, 1.0, example_input=example)
    assert one.ratio < 0.05 and one.expected_macs == 194_688 + SEED_D * 10
    half = expected_macs(seed_cnn, "1", 0.5, example_input=torch.zeros(4, 1, 28, 28), n_features=8, num_classes=10)
    assert half.head_macs == 194_688 and half.rule_macs == 80
    assert math.isclose(half.expected_macs, 194_688 + 80 + 0.5 * half.tail_macs)
    with pytest.raises(MocoError, match="coverage"):
        expected_macs(seed_cnn, 2, 1.5, example_input=example)


# ---------------------------------------------------------------------------- choosing the layer


class FixedFractionFit:
    """Injected fit: a rule that fires where feature 0 exceeds its ``quantile`` on the fitting data."""

    def __init__(self, quantiles):
        self.quantiles = dict(quantiles)
        self.calls = []

    def __call__(self, features, predictions):
        assert features.dtype == np.float32 and features.ndim == 2
        assert predictions.dtype == np.int64 and predictions.shape == (len(features),)
        layer = len(self.calls) + 1
        self.calls.append(features.shape)
        q = self.quantiles[layer]
        if q is None:
            raise MocoError("no rule reaches the error bound")
        threshold = -math.inf if q <= 0 else math.inf if q >= 1 else float(np.quantile(features[:, 0], q))
        return ThresholdRule(features.shape[1], threshold, cls=int(np.bincount(predictions).argmax()))


def test_suggest_layer_seed_cnn(seed_cnn):
    data = torch.randn(80, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    fit = FixedFractionFit({1: 0.75, 2: 0.25})  # layer 1 exits ~25%, layer 2 ~75%
    result = suggest_layer(seed_cnn, data, fit=fit, sample_size=60, holdout=0.5, batch_size=32, progress=False)
    assert isinstance(result, LayerSuggestion) and result.bottleneck == "2"
    assert [row.layer for row in result.table] == [1, 2]  # every split before conv2, the bottleneck
    assert all(isinstance(row, LayerCandidate) for row in result.table)
    assert fit.calls == [(30, SEED_D), (30, SEED_D)]
    assert result.n_fit == 30 and result.n_holdout == 30
    assert result.table[1].coverage > result.table[0].coverage > 0
    assert result.best is result.table[1] and isinstance(result.rule, ThresholdRule)
    full = result.full_macs
    for row in result.table:
        expected = row.head_macs + row.rule_macs + (1 - row.coverage) * row.tail_macs
        assert math.isclose(row.expected_macs, expected)
        assert math.isclose(row.macs_saved_fraction, 1 - expected / full)
    frame = result.to_dataframe()
    assert list(frame["layer"]) == [1, 2] and list(frame["best"]) == [False, True]
    text = result.to_text()
    assert "coverage" in text and "best: layer 2" in text
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.best = result.table[0]


def test_suggest_layer_ties_and_failures(seed_cnn):
    data = torch.randn(40, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    # equal coverage and equal costs at both candidates: the earliest wins
    tie = suggest_layer(seed_cnn, data, fit=FixedFractionFit({1: 0.0, 2: 0.0}), progress=False, holdout=0.5)
    assert tie.table[0].coverage == tie.table[1].coverage == 1.0
    assert tie.best is tie.table[0]
    # a fit that raises MocoError marks the candidate; the other one is chosen
    partial = suggest_layer(seed_cnn, data, fit=FixedFractionFit({1: None, 2: 0.5}), progress=False)
    assert partial.table[0].coverage == 0 and "no rule" in partial.table[0].note
    assert partial.best.layer == 2
    with pytest.raises(MocoError, match="no rule fires"):
        suggest_layer(seed_cnn, data, fit=FixedFractionFit({1: 1.0, 2: None}), progress=False)

    def too_little_data(features, predictions):
        raise MocoError("too few held-out samples to certify max_error")

    # the same reason at every candidate is said once (it was repeated per layer: a 4,000-character line)
    with pytest.raises(MocoError) as err:
        suggest_layer(seed_cnn, data, fit=too_little_data, progress=False)
    assert str(err.value).count("too few held-out samples") == 1 and "layers 1, 2" in str(err.value)


def test_suggest_layer_named_candidates_resnet():
    torch.manual_seed(0)
    model = create("resnet18", in_channels=1, width_multiplier=0.25).eval()
    data = torch.randn(12, 1, 28, 28, generator=torch.Generator().manual_seed(5))

    def fit(features, predictions):
        return ThresholdRule(features.shape[1], -math.inf, cls=0)  # every sample exits

    result = suggest_layer(model, data, candidates=["stem", "layer1"], fit=fit, progress=False)
    assert [row.layer for row in result.table] == ["stem", "layer1"]
    assert [row.features for row in result.table] == [16 * 28 * 28] * 2
    assert result.table[1].head_macs > result.table[0].head_macs
    assert result.best.layer == "stem"  # same coverage (1.0), cheaper head
    for row in result.table:
        assert row.head_macs + row.tail_macs == result.full_macs
    # default candidates: named split points (blocks too) while the tail still holds one of the heaviest convs
    # (layer4.0.conv2 and the layer4.1 convs tie with it), a part listed right before its parent tried once
    default = suggest_layer(model, data, fit=fit, progress=False)
    assert default.bottleneck == "layer4.0.conv2"
    assert [row.layer for row in default.table] == ["stem.0", "stem.1", "stem", "layer1.0", "layer1", "layer2.0",
                                                    "layer2", "layer3.0", "layer3", "layer4.0"]
    assert default.best.layer == "stem.0"  # ties (same head MACs and coverage) go to the earliest


def test_pooling_matches_capture_processors(seed_cnn, x):
    """A rule fitted on max-pooled features at a layer is usable with pooling="max" (issue 12 item 6)."""
    from moco.capture import SpatialPool, capture

    pooled = capture(seed_cnn, x, ["1"], processor=SpatialPool("max"), progress=False)["1"]
    assert pooled.shape == (len(x), 32)
    threshold = float(np.median(pooled[:, 0]))
    rule = ThresholdRule(32, threshold)
    for pooling in ("max", SpatialPool("max")):
        net = BranchedNetwork(seed_cnn, 2, rule, pooling=pooling)
        with torch.no_grad():
            _, mask = net(x)
        assert torch.equal(mask, torch.from_numpy(pooled[:, 0] > threshold))
    with pytest.raises(MocoError, match="after SpatialPool"):
        BranchedNetwork(seed_cnn, 2, ThresholdRule(SEED_D, 0.0), pooling="avg")(x[:2])
    with pytest.raises(MocoError, match="pooling must be"):
        BranchedNetwork(seed_cnn, 2, rule, pooling="median")


def test_forward_rejects_bad_inputs(seed_cnn):
    net = BranchedNetwork(seed_cnn, 2, ThresholdRule(SEED_D, 0.0))
    with pytest.raises(TypeError, match="dtype torch.uint8"):
        net(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(MocoError, match="NaN"):
        net(torch.full((2, 1, 28, 28), float("nan")))
    with pytest.raises(MocoError, match=r"reject an input of shape \(2, 3, 28, 28\)"):
        net(torch.zeros(2, 3, 28, 28))
    with pytest.raises(TypeError, match="torch.Tensor"):
        net(np.zeros((2, 1, 28, 28), dtype=np.float32))


def test_suggest_layer_tries_every_block_when_the_heaviest_convs_tie(constant_width_net):
    # a constant-width residual stage: every conv has the same MACs, and the first of them (the profiler's
    # bottleneck) used to leave only the stem as a candidate
    model = constant_width_net
    x = torch.randn(64, 1, 12, 12)
    result = suggest_layer(model, x, fit=lambda f, p: ThresholdRule(f.shape[1], -math.inf, cls=0, num_classes=3),
                           progress=False)
    assert result.bottleneck == "blocks.0.conv1"
    assert [row.layer for row in result.table] == ["stem", "blocks.0", "blocks.1"]


def test_the_default_fit_keeps_a_candidate_that_certifies_nothing_quiet():
    # suggest_layer shows such a candidate in its table; the engine's UncertifiedRuleWarning came once per
    # candidate with its source line echoed, before the step's own one-line outcome
    import warnings

    from moco.rules.branched import _fit_with_engine

    rng = np.random.default_rng(0)
    features = rng.normal(size=(600, 4)).astype(np.float32)
    predictions = rng.integers(0, 3, 600)   # nothing predicts these: no rule certifies
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rule = _fit_with_engine(features, predictions, layer=1, max_error=0.05, confidence=0.95)
    fired, _ = rule.assign(torch.from_numpy(features))
    assert not bool(fired.any())
