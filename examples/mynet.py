"""A user's own CNN, the kind moco is pointed at: BatchNorm, a residual block, squeeze-excitation and
activations called functionally in ``forward`` (nothing here is from moco's zoo).

Train it with ``python examples/train_mynet.py`` (writes ``examples/mynet.pt``, a plain state_dict).
"""

import torch
import torch.nn.functional as F
from torch import nn


class SqueezeExcite(nn.Module):
    """Channel attention: global average pool, two 1x1 convs, sigmoid gate."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.reduce = nn.Conv2d(channels, max(1, channels // reduction), 1)
        self.expand = nn.Conv2d(max(1, channels // reduction), channels, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(s))))


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.se = SqueezeExcite(channels)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return F.relu(out + x)


class Net(nn.Module):
    """conv-BN-ReLU, max pool, residual SE block, conv-BN-ReLU, max pool, global pool, linear."""

    def __init__(self, width: int = 16, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(width)
        self.block = ResidualBlock(width)
        self.conv = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn0(self.stem(x))), 2)
        x = self.block(x)
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
