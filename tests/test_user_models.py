"""Surgery on the patterns users' models have: BatchNorm, residual adds, squeeze-excitation written with
``Linear`` + ``.view(b, c, 1, 1)``, functional activations, and a channels-last (ConvNeXt-style) block with
``permute`` + ``LayerNorm`` + ``Linear``. The models are also imported by the PFA and pruning tests."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moco.compress.surgery import SurgeryError, apply, dependency_groups, load, save

X = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))


class SqueezeExcitation(nn.Module):
    """The common form: pool, ``.view(b, c)``, two ``Linear`` layers, ``.view(b, c, 1, 1)``, expand, multiply."""

    def __init__(self, channels: int, reduction: int = 4, hard_coded: bool = False):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(channels, channels // reduction)
        self.fc2 = nn.Linear(channels // reduction, channels)
        self.hard_coded = channels if hard_coded else None

    def forward(self, x):
        b, c, _, _ = x.size()
        y = self.pool(x).view(b, c)
        y = torch.sigmoid(self.fc2(F.relu(self.fc1(y))))
        y = y.view(b, self.hard_coded, 1, 1) if self.hard_coded else y.view(b, c, 1, 1)
        return x * y.expand_as(x)


class SEBlock(nn.Module):
    """conv-BN-relu, conv-BN, squeeze-excitation, residual add (with a 1x1 projection when shapes change)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, hard_coded: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.se = SqueezeExcitation(cout, hard_coded=hard_coded)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return F.relu(out + (x if self.short is None else self.short(x)))


class SEResNet(nn.Module):
    """A small user model: stem conv-BN-relu (functional), two SE residual blocks, global pool, classifier."""

    def __init__(self, width: int = 16, num_classes: int = 10, hard_coded: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.block1 = SEBlock(width, width, hard_coded=hard_coded)
        self.block2 = SEBlock(width, 2 * width, stride=2)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = self.block2(self.block1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ChannelsLastNet(nn.Module):
    """A ConvNeXt-style block: depthwise conv, permute to NHWC, LayerNorm, Linear 4x, GELU, Linear, permute back."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.dw = nn.Conv2d(width, width, 7, padding=3, groups=width)
        self.norm = nn.LayerNorm(width)
        self.pw1 = nn.Linear(width, 4 * width)
        self.pw2 = nn.Linear(4 * width, width)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(self.norm(y)))).permute(0, 3, 1, 2)
        return self.head((x + y).mean((2, 3)))


def seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and non-trivial BatchNorm statistics, so that slicing mistakes change outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def _full_keep(model, x):
    return {g.layers[0]: range(g.units) for g in dependency_groups(model, x) if g.prunable}


@pytest.mark.parametrize("cls", [SEResNet, ChannelsLastNet])
def test_identical_outputs_when_every_unit_is_kept(cls):
    torch.manual_seed(0)
    model = seeded(cls())
    keep = _full_keep(model, X)
    assert len(keep) >= 2  # the SE / channels-last layers are prunable, not pinned
    same = apply(model, keep, X)
    assert torch.equal(same(X), model(X))


def test_se_groups_tie_the_gate_to_its_block():
    groups = {g.layers: g for g in dependency_groups(SEResNet(), X)}
    assert groups[("conv", "block1.conv2", "block1.se.fc2")].prunable  # stem, residual, SE gate: one group
    assert groups[("block1.se.fc1",)].units == 4 and groups[("block1.se.fc1",)].prunable
    assert groups[("block2.conv2", "block2.se.fc2", "block2.short.0")].prunable
    assert not groups[("fc",)].prunable


def test_se_pruning_is_exact_on_dead_channels_and_shapes_follow():
    """Removed channels made dead (zero BN scale and shift, zero SE rows) leave the outputs unchanged."""
    torch.manual_seed(0)
    model = seeded(SEResNet())
    removed = [1, 4, 5, 9, 14]
    hidden_removed = [2]
    with torch.no_grad():
        for bn in (model.bn, model.block1.bn2):
            bn.weight[removed] = 0.0
            bn.bias[removed] = 0.0
        model.block1.se.fc1.weight[hidden_removed] = 0.0
        model.block1.se.fc1.bias[hidden_removed] = -1.0  # relu(-1) = 0: the hidden unit is dead
    kept = [i for i in range(16) if i not in removed]
    small = apply(model, {"conv": kept, "block1.se.fc1": [0, 1, 3]}, X)
    torch.testing.assert_close(small(X), model(X), rtol=1e-5, atol=1e-5)
    se = small.block1.se
    assert (se.fc1.in_features, se.fc1.out_features, se.fc2.in_features, se.fc2.out_features) == (11, 3, 3, 11)
    assert small.block2.conv1.in_channels == small.block2.short[0].in_channels == 11
    assert small.block1.bn2.num_features == small.bn.num_features == 11


def test_channels_last_block_prunes_layernorm_and_linears():
    torch.manual_seed(0)
    model = ChannelsLastNet().eval()
    groups = {g.layers: g for g in dependency_groups(model, X)}
    assert groups[("stem", "dw", "pw2")].prunable and groups[("pw1",)].prunable
    small = apply(model, {"stem": range(0, 16, 2), "pw1": range(0, 64, 4)}, X)
    assert small(X).shape == (4, 10)
    assert small.norm.normalized_shape == (8,) and small.norm.weight.shape == (8,)
    assert (small.pw1.in_features, small.pw1.out_features, small.pw2.out_features, small.head.in_features) == (
        8, 16, 8, 8)
    # hidden units of the channels-last MLP made dead are removed exactly
    with torch.no_grad():
        model.pw1.weight[1::2] = 0.0
        model.pw1.bias[1::2] = 0.0  # gelu(0) = 0
    exact = apply(model, {"pw1": range(0, 64, 2)}, X)
    torch.testing.assert_close(exact(X), model(X), rtol=1e-5, atol=1e-5)


def test_hard_coded_sizes_are_still_refused_clearly():
    model = SEResNet(hard_coded=True).eval()
    stage = next(g for g in dependency_groups(model, X) if "conv" in g.layers)
    assert "block1.conv2" in stage.layers
    assert not stage.prunable and "hard-coded size 16" in stage.reason
    with pytest.raises(SurgeryError, match=r"view\(\) \(node 'view_1'\) with the hard-coded size 16"):
        apply(model, {"conv": range(8)}, X)
    apply(model, {"block2.conv1": range(8)}, X)  # the rest of the model is still prunable


def test_save_load_round_trip_with_layernorm(tmp_path):
    model = ChannelsLastNet().eval()
    small = apply(model, {"stem": range(0, 16, 2)}, X)
    save(small, tmp_path / "cl")
    again = load(tmp_path / "cl", base=model)
    assert torch.equal(again(X), small(X))
