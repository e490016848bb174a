"""ShuffleNet V2 for CIFAR (Ma et al., 2018, "ShuffleNet V2: Practical Guidelines for Efficient CNN
Architecture Design").

Channel split, equal-width branches and channel shuffle; a 1x1 stem without downsampling for
32x32 inputs, as in the KD benchmarks' ``ShuffleV2`` student. Module names match RepDistiller's
``models/ShuffleNetv2.py``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.models.registry import register_model

# net_size -> (stage widths + final 1x1 width, units per stage), from Ma et al. Table 5 as adapted
# by the CIFAR reference implementation
_CONFIGS = {
    0.2: ((40, 80, 160, 512), (3, 3, 3)),
    0.3: ((40, 80, 160, 512), (3, 7, 3)),
    0.5: ((48, 96, 192, 1024), (3, 7, 3)),
    1.0: ((116, 232, 464, 1024), (3, 7, 3)),
    1.5: ((176, 352, 704, 1024), (3, 7, 3)),
    2.0: ((224, 488, 976, 2048), (3, 7, 3)),
}


class ShuffleBlock(nn.Module):
    def __init__(self, groups: int = 2):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        n, c, h, w = x.shape
        return x.reshape(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class SplitBlock(nn.Module):
    def __init__(self, ratio: float):
        super().__init__()
        self.ratio = ratio

    def forward(self, x):
        c = int(x.size(1) * self.ratio)
        return x[:, :c], x[:, c:]


class BasicBlock(nn.Module):
    """Stride-1 unit: half the channels pass through, the other half go through 1x1-dw3x3-1x1."""

    def __init__(self, channels: int, split_ratio: float = 0.5):
        super().__init__()
        self.split = SplitBlock(split_ratio)
        c = int(channels * split_ratio)
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.shuffle = ShuffleBlock()

    def forward(self, x):
        x1, x2 = self.split(x)
        out = F.relu(self.bn1(self.conv1(x2)))
        out = F.relu(self.bn3(self.conv3(self.bn2(self.conv2(out)))))
        return self.shuffle(torch.cat([x1, out], 1))


class DownBlock(nn.Module):
    """Stride-2 unit: both branches see the whole input and each yields half the output channels."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = cout // 2
        self.conv1 = nn.Conv2d(cin, cin, 3, stride=2, padding=1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv2 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ShuffleBlock()

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(nn.Module):
    def __init__(self, net_size: float = 1.0, num_classes: int = 100):
        super().__init__()
        if float(net_size) not in _CONFIGS:
            raise ValueError(f"ShuffleNetV2 net_size must be one of {sorted(_CONFIGS)}; got {net_size}")
        widths, blocks = _CONFIGS[float(net_size)]
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        cin = 24
        for i, (cout, n) in enumerate(zip(widths[:3], blocks), start=1):
            units = [DownBlock(cin, cout)] + [BasicBlock(cout) for _ in range(n)]
            self.add_module(f"layer{i}", nn.Sequential(*units))
            cin = cout
        self.conv2 = nn.Conv2d(cin, widths[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # = avg_pool2d(4) of the reference on 32x32 inputs
        self.linear = nn.Linear(widths[3], num_classes)
        self.kd_stages = ["layer1", "layer2", "layer3"]
        self.kd_embedding = "avgpool"

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.linear(self.avgpool(x).flatten(1))


@register_model("shufflenetv2", family="shufflenet")
def shufflenetv2(num_classes: int = 100, net_size: float = 1.0) -> nn.Module:
    """ShuffleNet V2 for 32x32 inputs (Ma et al., 2018); net_size 1 is RepDistiller's ``ShuffleV2``."""
    return ShuffleNetV2(net_size, num_classes)
