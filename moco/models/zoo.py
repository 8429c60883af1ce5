"""The architectures of the seed documents, each a plain ``nn.Module``."""

from __future__ import annotations

import math

import torch
from torch import nn

from moco.models.registry import register

__all__ = [
    "BasicBlock", "DepthwiseSeparable", "LeNet5", "MobileNetV1", "ResNet18", "fashion_cnn", "lenet5",
    "mobilenet_v1", "resnet18", "seed_cnn", "vgg_bn",
]


def _check_positive(**values) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be a positive int, got {value!r}")


@register("seed_cnn", input_shape=(1, 28, 28), dataset="mnist")
def seed_cnn(num_classes: int = 10) -> nn.Sequential:
    """Seed 000's MNIST CNN, exactly: two 3x3 convs, max-pool, 9216->128->classes (1.2M params).

    Split index 2 (``model[:2]``, conv1 + first ReLU, 32x26x26) is the capture point of seed 000.
    """
    _check_positive(num_classes=num_classes)
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, 1),  # 28x28 -> 26x26
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, 1),  # 26x26 -> 24x24
        nn.ReLU(),
        nn.MaxPool2d(2),  # 24x24 -> 12x12
        nn.Flatten(),
        nn.Linear(64 * 12 * 12, 128),
        nn.ReLU(),
        nn.Dropout(0.25),
        nn.Linear(128, num_classes),
    )


_INITS = {
    "default": None,
    "xavier": nn.init.xavier_uniform_,
    "orthogonal": nn.init.orthogonal_,
    "kaiming": nn.init.kaiming_uniform_,
}


@register("fashion_cnn", input_shape=(1, 28, 28), dataset="fashion_mnist")
def fashion_cnn(
    c1_kernel: int = 3,
    c2_kernel: int = 3,
    c1_channels: int = 16,
    c2_channels: int = 16,
    hidden: int = 100,
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: int = 28,
    init: str = "default",
) -> nn.Sequential:
    """Seed 003's two-conv network ``Params1(c1_kernel, c2_kernel, c1_channels, c2_channels, hidden)``.

    conv(k1) -> ReLU -> conv(k2) -> ReLU -> flatten -> linear(hidden) -> ReLU -> linear(classes), no
    padding and no pooling, so the seed's FLOP formula applies. ``init`` is ``"default"`` (PyTorch's),
    ``"xavier"`` (seed 003 step 1) or ``"orthogonal"`` (its best ``Params2``); biases start at zero when
    an init is given.
    """
    _check_positive(
        c1_kernel=c1_kernel, c2_kernel=c2_kernel, c1_channels=c1_channels, c2_channels=c2_channels,
        hidden=hidden, num_classes=num_classes, in_channels=in_channels, input_size=input_size,
    )
    if init not in _INITS:
        raise ValueError(f"init must be one of {sorted(_INITS)}, got {init!r}")
    side = input_size - c1_kernel - c2_kernel + 2
    if side < 1:
        raise ValueError(
            f"kernels {c1_kernel} and {c2_kernel} leave no pixels of a {input_size}x{input_size} input"
        )
    model = nn.Sequential(
        nn.Conv2d(in_channels, c1_channels, c1_kernel),
        nn.ReLU(),
        nn.Conv2d(c1_channels, c2_channels, c2_kernel),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(c2_channels * side * side, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )
    init_fn = _INITS[init]
    if init_fn is not None:
        for module in model:
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                init_fn(module.weight)
                nn.init.zeros_(module.bias)
    return model


class LeNet5(nn.Module):
    """LeNet-5 with BatchNorm as in seed 002 (agnapprox): 61,932 parameters ("61.9 K").

    conv5x5(6, pad 2)-BN-ReLU-maxpool, conv5x5(16)-BN-ReLU-maxpool, then 400->120->84 (linear without
    bias, BN, ReLU) and 84->classes.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.conv2 = nn.Sequential(nn.Conv2d(6, 16, 5, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2))
        self.flatten = nn.Flatten()
        self.fc1 = nn.Sequential(nn.Linear(16 * 5 * 5, 120, bias=False), nn.BatchNorm1d(120), nn.ReLU())
        self.fc2 = nn.Sequential(nn.Linear(120, 84, bias=False), nn.BatchNorm1d(84), nn.ReLU())
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.fc2(self.fc1(self.flatten(self.conv2(self.conv1(x))))))


@register("lenet5", input_shape=(1, 28, 28), dataset="mnist")
def lenet5(num_classes: int = 10, in_channels: int = 1) -> LeNet5:
    """Seed 002's LeNet-5 with BatchNorm for 28x28 inputs (61,932 params)."""
    _check_positive(num_classes=num_classes, in_channels=in_channels)
    return LeNet5(num_classes, in_channels)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN, identity or 1x1 projection shortcut, residual add."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 with a small-image stem (3x3 conv, stride 1, no max-pool) for 28x28 / 32x32 inputs.

    Stages are the named children ``stem, layer1, layer2, layer3, layer4, pool, flatten, fc``, so
    exits and splits can be placed after any stage by name.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_multiplier: float = 1.0):
        super().__init__()
        widths = [max(1, int(round(w * width_multiplier))) for w in (64, 128, 256, 512)]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        layers, in_planes = [], widths[0]
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(self.flatten(self.pool(x)))


@register("resnet18", input_shape=(3, 32, 32), dataset="cifar10")
def resnet18(num_classes: int = 10, in_channels: int = 3, width_multiplier: float = 1.0) -> ResNet18:
    """ResNet-18 with a small-image stem (seed 004); ``width_multiplier`` scales every stage's width."""
    _check_positive(num_classes=num_classes, in_channels=in_channels)
    if not width_multiplier > 0:
        raise ValueError(f"width_multiplier must be > 0, got {width_multiplier!r}")
    return ResNet18(num_classes, in_channels, width_multiplier)


def _conv_bn_relu(cin: int, cout: int, stride: int, groups: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class DepthwiseSeparable(nn.Module):
    """MobileNet block: 3x3 depthwise conv-BN-ReLU, then 1x1 pointwise conv-BN-ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.depthwise = _conv_bn_relu(cin, cin, stride, groups=cin)
        self.pointwise = _conv_bn_relu(cin, cout, 1, kernel=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


# (output channels, stride) of the 13 depthwise-separable blocks, CIFAR variant (first stride 1).
_MOBILENET_CFG = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]


class MobileNetV1(nn.Module):
    """MobileNet v1 for 32x32 inputs: 3x3 stem (stride 1), 13 depthwise-separable blocks, avg-pool, fc."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_multiplier: float = 1.0):
        super().__init__()

        def w(c: int) -> int:
            return max(8, int(math.ceil(c * width_multiplier / 8) * 8)) if width_multiplier != 1.0 else c

        cin = w(32)
        self.stem = _conv_bn_relu(in_channels, cin, 1)
        blocks = []
        for cout, stride in _MOBILENET_CFG:
            blocks.append(DepthwiseSeparable(cin, w(cout), stride))
            cin = w(cout)
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.features(self.stem(x)))))


@register("mobilenet_v1", input_shape=(3, 32, 32), dataset="cifar10")
def mobilenet_v1(num_classes: int = 10, in_channels: int = 3, width_multiplier: float = 1.0) -> MobileNetV1:
    """MobileNet v1 for 32x32 inputs (seed 001); ``width_multiplier`` scales channels (rounded to 8)."""
    _check_positive(num_classes=num_classes, in_channels=in_channels)
    if not width_multiplier > 0:
        raise ValueError(f"width_multiplier must be > 0, got {width_multiplier!r}")
    return MobileNetV1(num_classes, in_channels, width_multiplier)


@register("vgg_bn", input_shape=(1, 28, 28), dataset="fashion_mnist")
def vgg_bn(
    widths: tuple[int, ...] = (32, 32, 64, 64, 128, 128),
    *,
    convs_per_stage: int = 2,
    num_classes: int = 10,
    in_channels: int = 1,
) -> nn.Sequential:
    """VGG-style CNN with BatchNorm (seed 001's PFA benchmark): conv3x3-BN-ReLU stages, max-pool between.

    A flat ``nn.Sequential``: for each width a ``Conv2d(3x3, padding 1, no bias)``, ``BatchNorm2d`` and
    ``ReLU``; a ``MaxPool2d(2)`` after every ``convs_per_stage`` convs except the last stage; then
    global average pooling, ``Flatten`` and ``Linear(widths[-1], num_classes)``. The default widths
    32-32-64-64-128-128 give three stages at 28, 14 and 7 pixels (28x28 input): 288,170 parameters,
    29.1 M MACs per image. Conv ``i`` is module ``str(3 * i + pools_before)`` (see ``named_modules()``).
    """
    widths = tuple(widths)
    if not widths:
        raise ValueError("widths must name at least one conv layer, e.g. (32, 32, 64, 64, 128, 128)")
    _check_positive(num_classes=num_classes, in_channels=in_channels, convs_per_stage=convs_per_stage,
                    **{f"widths[{i}]": w for i, w in enumerate(widths)})
    layers: list[nn.Module] = []
    cin = in_channels
    for i, w in enumerate(widths):
        layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
        cin = w
        if (i + 1) % convs_per_stage == 0 and i + 1 < len(widths):
            layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)
