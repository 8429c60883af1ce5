"""split_at / split_points: exact equality, shared parameters, untouched models, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moco.errors import MocoError
from moco.models import create
from moco.split import ModelSplit, split_at, split_boundaries, split_points


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model: nn.Module, state: dict[str, torch.Tensor], modules: dict[str, nn.Module]) -> None:
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert dict(model.named_modules()) == modules
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert not module._backward_hooks


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    model = create("resnet18", width_multiplier=0.25, in_channels=1)
    # Non-trivial BatchNorm statistics so that eval-mode BN actually changes values.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def lenet() -> nn.Module:
    torch.manual_seed(0)
    return create("lenet5").eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def test_seed_cnn_index_2_is_conv1_relu(seed_cnn, x):
    state, modules = _state(seed_cnn), dict(seed_cnn.named_modules())
    split = split_at(seed_cnn, 2)
    assert isinstance(split, ModelSplit)
    assert split.index == 2 and split.point == "1"
    with torch.no_grad():
        hidden = split.head(x)
        assert hidden.shape == (6, 32, 26, 26)
        assert torch.equal(split.tail(hidden), seed_cnn(x))
    assert split.head[0] is seed_cnn[0] and split.tail[0] is seed_cnn[2]
    assert list(split.tail._modules) == [str(i) for i in range(2, 10)]
    _assert_untouched(seed_cnn, state, modules)


def test_seed_cnn_every_index_is_exact_and_shares_parameters(seed_cnn, x):
    params = {id(p) for p in seed_cnn.parameters()}
    with torch.no_grad():
        expected = seed_cnn(x)
        for k in range(1, len(seed_cnn)):
            split = split_at(seed_cnn, k)
            assert torch.equal(split.tail(split.head(x)), expected), k
            shared = [*split.head.parameters(), *split.tail.parameters()]
            assert {id(p) for p in shared} == params and len(shared) == len(params)
            by_name = split_at(seed_cnn, str(k - 1))
            assert by_name.index == k and by_name.point == split.point


def test_sequential_training_through_split_trains_the_model(seed_cnn):
    model = create("seed_cnn")
    split = split_at(model, 4)
    before = model[0].weight.detach().clone()
    loss = split.tail(split.head(torch.randn(2, 1, 28, 28))).sum()
    loss.backward()
    assert model[0].weight.grad is not None
    with torch.no_grad():
        model[0].weight.sub_(model[0].weight.grad)
    assert not torch.equal(split.head[0].weight, before)


@pytest.mark.parametrize("layer", [0, 10, 12, -1])
def test_sequential_index_out_of_range(seed_cnn, layer):
    with pytest.raises(MocoError, match=rf"layer {layer} is out of range for a Sequential of 10 modules; choose 1\.\.9"):
        split_at(seed_cnn, layer)


@pytest.mark.parametrize("layer", [2.0, True, None, [2], b"1"])
def test_wrong_layer_type(seed_cnn, layer):
    with pytest.raises(TypeError, match="layer must be an int split index or a str module name"):
        split_at(seed_cnn, layer)


def test_last_module_name_leaves_no_tail(seed_cnn):
    with pytest.raises(MocoError, match="out of range"):
        split_at(seed_cnn, "9")


def test_int_on_non_sequential(resnet):
    with pytest.raises(MocoError, match="pass a module name"):
        split_at(resnet, 2)


@pytest.mark.parametrize("layer", ["stem", "layer1", "layer2", "layer3", "layer2.0", "layer4", "pool", "flatten"])
def test_resnet_by_name_is_exact(resnet, layer):
    state, modules = _state(resnet), dict(resnet.named_modules())
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    split = split_at(resnet, layer)
    assert split.point == layer and split.index is None
    with torch.no_grad():
        hidden = split.head(x)
        expected_hidden = {}
        handle = resnet.get_submodule(layer).register_forward_hook(lambda m, i, o: expected_hidden.setdefault("h", o))
        try:
            expected = resnet(x)
        finally:
            handle.remove()
        assert torch.equal(hidden, expected_hidden["h"])
        assert torch.equal(split.tail(hidden), expected)
    # The head holds the original module at the split point; every parameter is shared, none copied.
    assert split.head.get_submodule(layer) is resnet.get_submodule(layer)
    model_params = {id(p) for p in resnet.parameters()}
    head_params = {id(p) for p in split.head.parameters()}
    tail_params = {id(p) for p in split.tail.parameters()}
    assert head_params | tail_params == model_params
    assert not head_params & tail_params
    _assert_untouched(resnet, state, modules)


def test_resnet_tail_shares_leaf_modules(resnet):
    split = split_at(resnet, "layer2")
    assert split.tail.get_submodule("layer3.0.conv1") is resnet.layer3[0].conv1
    assert split.tail.get_submodule("fc") is resnet.fc
    # Containers the trace went through are rebuilt as plain Modules around the original leaves.
    assert split.head.get_submodule("layer1.1.bn2") is resnet.layer1[1].bn2
    assert split_at(resnet, "layer1").head.get_submodule("layer1") is resnet.layer1


def test_resnet_training_mode_split_matches(resnet):
    """In training mode too (batch statistics, no dropout in ResNet) the ops are the same."""
    model = create("resnet18", width_multiplier=0.25, in_channels=1).train()
    x = torch.randn(4, 1, 28, 28)
    split = split_at(model, "layer1")
    with torch.no_grad():
        snapshot = _state(model)
        expected = model(x)
        model.load_state_dict(snapshot)  # undo the running-stat update before the second pass
        assert torch.equal(split.tail(split.head(x)), expected)


@pytest.mark.parametrize("layer", ["conv1", "fc1", "conv2.3", "flatten"])
def test_lenet_by_name_is_exact(lenet, x, layer):
    state, modules = _state(lenet), dict(lenet.named_modules())
    split = split_at(lenet, layer)
    with torch.no_grad():
        assert torch.equal(split.tail(split.head(x)), lenet(x))
    if layer == "conv1":
        assert split.head(x).shape == (6, 6, 14, 14)
    if layer == "fc1":
        assert split.head(x).shape == (6, 120)
    _assert_untouched(lenet, state, modules)


def test_inside_residual_block_names_crossing_values(resnet):
    with pytest.raises(MocoError) as info:
        split_at(resnet, "layer1.0.conv1")
    message = str(info.value)
    assert "cannot split ResNet18 at 'layer1.0.conv1'" in message
    assert "values ['stem_2' (output of 'stem.2')] computed before it are used after it" in message
    assert "split at a block boundary such as 'layer1.0'" in message


def test_module_called_twice(resnet):
    with pytest.raises(MocoError, match="'layer1.0.relu' is called 2 times per forward pass"):
        split_at(resnet, "layer1.0.relu")


def test_nothing_left_for_tail(resnet):
    with pytest.raises(MocoError, match="last step; nothing would be left for the tail"):
        split_at(resnet, "fc")


@pytest.mark.parametrize("name", ["layer9", "layer1.5", "fc.weight", ""])
def test_unknown_name(resnet, name):
    with pytest.raises(MocoError, match="no module named|after the whole model"):
        split_at(resnet, name)


def test_unknown_name_suggests_close_match(resnet):
    with pytest.raises(MocoError, match=r"did you mean 'layer1'"):
        split_at(resnet, "layr1")


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:
            h = -h
        return self.b(h)


def test_untraceable_model_is_a_clear_error():
    with pytest.raises(MocoError, match=r"cannot trace _DataDependent with torch.fx.*nn.Sequential"):
        split_at(_DataDependent(), "a")
    assert split_points(_DataDependent()) == []


class _NotCalled(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.relu(self.used(x)) * 2)


def test_module_not_called():
    with pytest.raises(MocoError, match="'unused' is not called as a step"):
        split_at(_NotCalled(), "unused")


def test_functional_ops_after_split_go_to_tail():
    model = _NotCalled().eval()
    x = torch.randn(3, 4)
    split = split_at(model, "used")
    with torch.no_grad():
        assert torch.equal(split.tail(split.head(x)), model(x))
    assert split_points(model) == ["used"]


class _WithAttr(nn.Module):
    """Reads a parameter directly (get_attr) both before and after the split point."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        return self.b(self.a(x * self.scale) * self.scale)


def test_attributes_are_reread_in_tail():
    model = _WithAttr()
    x = torch.randn(3, 4)
    split = split_at(model, "a")
    with torch.no_grad():
        assert torch.equal(split.tail(split.head(x)), model(x))
    assert split.tail.get_parameter("scale") is model.scale


def test_nested_sequential_name_uses_fx():
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), nn.Linear(8, 3)).eval()
    x = torch.randn(5, 4)
    split = split_at(model, "0.0")
    assert split.index is None
    with torch.no_grad():
        assert torch.equal(split.tail(split.head(x)), model(x))
    assert split_points(model) == ["0.0", "0.1", "0"]


@pytest.mark.parametrize(
    "name, kwargs, shape",
    [
        ("seed_cnn", {}, (1, 28, 28)),
        ("lenet5", {}, (1, 28, 28)),
        ("resnet18", {"width_multiplier": 0.25, "in_channels": 1}, (1, 28, 28)),
        ("mobilenet_v1", {"width_multiplier": 0.25}, (3, 32, 32)),
    ],
)
def test_split_points_all_split(name, kwargs, shape):
    torch.manual_seed(0)
    model = create(name, **kwargs).eval()
    state, modules = _state(model), dict(model.named_modules())
    points = split_points(model)
    assert points and len(points) == len(set(points))
    x = torch.randn(2, *shape)
    with torch.no_grad():
        expected = model(x)
        for point in points:
            split = split_at(model, point)
            assert torch.equal(split.tail(split.head(x)), expected), point
    _assert_untouched(model, state, modules)


def test_split_points_order_and_content(seed_cnn, resnet, lenet):
    assert split_points(seed_cnn) == [str(i) for i in range(9)]
    # the blocks inside each stage are boundaries too (a residual crosses their own leaves); a stage is listed
    # right after its last block, at the same boundary
    assert split_points(resnet) == [
        "stem.0", "stem.1", "stem.2", "stem", "layer1.0", "layer1.1", "layer1", "layer2.0", "layer2.1", "layer2",
        "layer3.0", "layer3.1", "layer3", "layer4.0", "layer4.1", "layer4", "pool", "flatten",
    ]
    assert split_boundaries(resnet) == [
        "stem.0", "stem.1", "stem", "layer1.0", "layer1", "layer2.0", "layer2", "layer3.0", "layer3", "layer4.0",
        "layer4", "pool", "flatten",
    ]
    lenet_points = split_points(lenet)
    assert lenet_points[:5] == ["conv1.0", "conv1.1", "conv1.2", "conv1.3", "conv1"]
    assert lenet_points[-4:] == ["fc2.0", "fc2.1", "fc2.2", "fc2"]
    assert "fc3" not in lenet_points


def test_blocks_nested_in_a_container_are_split_points(constant_width_net):
    # only "stem" and "blocks" were found: the blocks are not top-level children, and a residual crosses their leaves
    model = constant_width_net
    assert split_points(model) == ["stem", "blocks.0", "blocks.1", "blocks.2", "blocks"]
    assert split_boundaries(model) == ["stem", "blocks.0", "blocks.1", "blocks"]
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        for point in split_boundaries(model):
            split = split_at(model, point)
            assert torch.equal(split.tail(split.head(x)), model(x)), point
