"""CIFAR ResNets (He et al., 2016, "Deep Residual Learning for Image Recognition", Sec. 4.2).

Three stages of ``(depth - 2) / 6`` basic blocks on 32x32, 16x16 and 8x8 maps. The ``x4`` variants
of the KD benchmarks (Tian et al., 2020) quadruple the stage widths. Module names match
RepDistiller's ``models/resnet.py`` so its checkpoints load unchanged.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from kdray.models.registry import register_model


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:  # projection shortcut, option B of He et al.
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        identity = x if self.downsample is None else self.downsample(x)
        # not in-place: the block output may be held by a feature hook
        return F.relu(out + identity)


class CifarResNet(nn.Module):
    """``num_filters`` = (stem, stage1, stage2, stage3) widths; depth must be 6n+2."""

    def __init__(self, depth: int, num_filters: list[int], num_classes: int = 100):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, 32, ...); got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, num_filters[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        cin = num_filters[0]
        for i, (cout, stride) in enumerate(zip(num_filters[1:], (1, 2, 2)), start=1):
            blocks = [BasicBlock(cin, cout, stride)] + [BasicBlock(cout, cout) for _ in range(n - 1)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            cin = cout
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # = AvgPool2d(8) of the reference on 32x32 inputs
        self.fc = nn.Linear(cin, num_classes)
        self.kd_stages = ["layer1", "layer2", "layer3"]
        self.kd_embedding = "avgpool"

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def resnet_cifar(depth: int, base: tuple[int, ...] = (16, 16, 32, 64), width_mult: float = 1.0,
                 num_classes: int = 100) -> CifarResNet:
    widths = [max(1, int(round(c * width_mult))) for c in base]
    return CifarResNet(depth, widths, num_classes)


def _register(name: str, depth: int, base: tuple[int, ...]):
    def build(num_classes: int = 100, width_mult: float = 1.0) -> nn.Module:
        return resnet_cifar(depth, base, width_mult, num_classes)

    build.__name__ = name
    build.__doc__ = f"CIFAR ResNet-{depth}, stage widths {base[1:]} x width_mult (He et al., 2016)."
    register_model(name, family="resnet")(build)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register(f"resnet{_depth}", _depth, (16, 16, 32, 64))
for _depth in (8, 32):
    _register(f"resnet{_depth}x4", _depth, (32, 64, 128, 256))
