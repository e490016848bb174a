"""ShuffleNet for CIFAR (Zhang et al., 2018, "ShuffleNet: An Extremely Efficient CNN for Mobile Devices").

Group-3 configuration (240, 480, 960 channels; 4, 8, 4 units) with a 1x1 stem and no stem
downsampling, as in the KD benchmarks' ``ShuffleV1`` student. Module names match RepDistiller's
``models/ShuffleNetv1.py``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.models.registry import register_model


class ShuffleBlock(nn.Module):
    """Channel shuffle, so that stacked group convolutions exchange information across groups."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        n, c, h, w = x.shape
        return x.reshape(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class Bottleneck(nn.Module):
    """ShuffleNet unit; with stride 2 the shortcut is average-pooled and concatenated."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid = cout // 4
        g = 1 if cin == 24 else groups  # the first unit sees the 24-channel stem: too few to group
        self.conv1 = nn.Conv2d(cin, mid, 1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.shuffle1 = ShuffleBlock(g)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride == 2:
            self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1))

    def forward(self, x):
        out = self.shuffle1(F.relu(self.bn1(self.conv1(x))))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return F.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleNet(nn.Module):
    def __init__(self, out_planes=(240, 480, 960), num_blocks=(4, 8, 4), groups: int = 3,
                 num_classes: int = 100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        cin = 24
        for i, (cout, n) in enumerate(zip(out_planes, num_blocks), start=1):
            # the first, strided unit concatenates its input, so it only computes cout - cin channels
            units = [Bottleneck(cin, cout - cin, 2, groups)]
            units += [Bottleneck(cout, cout, 1, groups) for _ in range(n - 1)]
            self.add_module(f"layer{i}", nn.Sequential(*units))
            cin = cout
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # = avg_pool2d(4) of the reference on 32x32 inputs
        self.linear = nn.Linear(cin, num_classes)
        self.kd_stages = ["layer1", "layer2", "layer3"]
        self.kd_embedding = "avgpool"

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.avgpool(x).flatten(1))


@register_model("shufflenetv1", family="shufflenet")
def shufflenetv1(num_classes: int = 100) -> nn.Module:
    """ShuffleNet g=3 for 32x32 inputs (Zhang et al., 2018); RepDistiller's ``ShuffleV1``."""
    return ShuffleNet(num_classes=num_classes)
