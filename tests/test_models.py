import pytest
import torch
from torch import nn

from moco.models import create, get_spec, input_shape, list_models


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_the_seed_architectures():
    assert {"seed_cnn", "fashion_cnn", "lenet5", "resnet18", "mobilenet_v1"} <= set(list_models())
    assert get_spec("seed_cnn").input_shape == (1, 28, 28)


def test_seed_cnn_is_the_seed_000_sequential_exactly():
    model = create("seed_cnn")
    assert isinstance(model, nn.Sequential)
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Conv2d", "ReLU", "Conv2d", "ReLU", "MaxPool2d", "Flatten", "Linear", "ReLU", "Dropout", "Linear"]
    assert (model[0].in_channels, model[0].out_channels, model[0].kernel_size) == (1, 32, (3, 3))
    assert (model[2].in_channels, model[2].out_channels, model[2].kernel_size) == (32, 64, (3, 3))
    assert (model[6].in_features, model[6].out_features) == (9216, 128)
    assert (model[9].in_features, model[9].out_features) == (128, 10)
    assert model[8].p == 0.25
    assert n_params(model) == 1_199_882
    assert model[:2](torch.zeros(1, 1, 28, 28)).shape == (1, 32, 26, 26)  # seed 000: layer=2


@pytest.mark.parametrize("params,expected", [
    ((3, 3, 16, 16, 100), 16 * 9 + 16 + 16 * 16 * 9 + 16 + 16 * 576 * 100 + 100 + 1010),
    ((3, 3, 8, 32, 50), 80 + 2336 + 921_650 + 510),
    ((5, 3, 32, 16, 50), 32 * 25 + 32 + 16 * 32 * 9 + 16 + 16 * 22 * 22 * 50 + 50 + 510),
])
def test_fashion_cnn_follows_params1(params, expected):
    model = create("fashion_cnn", **dict(zip(["c1_kernel", "c2_kernel", "c1_channels", "c2_channels", "hidden"], params)))
    assert n_params(model) == expected
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_fashion_cnn_init_options_zero_the_bias():
    model = create("fashion_cnn", init="orthogonal")
    assert torch.count_nonzero(model[0].bias) == 0
    with pytest.raises(ValueError, match="init must be one of"):
        create("fashion_cnn", init="nope")
    with pytest.raises(ValueError, match="leave no pixels"):
        create("fashion_cnn", c1_kernel=15, c2_kernel=15)


def test_lenet5_matches_the_seed_002_parameter_count():
    assert n_params(create("lenet5")) == 61_932  # agnapprox's "61.9 K"
    assert create("lenet5").eval()(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_resnet18_small_stem_and_named_stages():
    model = create("resnet18")
    assert n_params(model) == 11_173_962  # the usual CIFAR ResNet-18
    names = [name for name, _ in model.named_children()]
    assert names == ["stem", "layer1", "layer2", "layer3", "layer4", "pool", "flatten", "fc"]
    small = create("resnet18", in_channels=1, width_multiplier=0.25).eval()
    assert small(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert small.stem[0].stride == (1, 1)


def test_mobilenet_v1_width_multiplier():
    assert n_params(create("mobilenet_v1")) == 3_217_226
    half = create("mobilenet_v1", width_multiplier=0.5).eval()
    assert half.fc.in_features == 512
    assert half(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert any(m.groups > 1 for m in half.modules() if isinstance(m, nn.Conv2d))


def test_clear_errors_for_unknown_model_and_argument():
    with pytest.raises(ValueError, match="unknown model 'vgg99'; choose one of"):
        create("vgg99")
    with pytest.raises(TypeError, match="takes no argument"):
        create("seed_cnn", width_multiplier=2)
    with pytest.raises(ValueError, match="positive int"):
        create("seed_cnn", num_classes=0)
    assert input_shape("resnet18", in_channels=1, input_size=28) == (1, 28, 28)
