"""Wide residual networks (Zagoruyko & Komodakis, 2016, "Wide Residual Networks").

Pre-activation blocks, three groups of ``(depth - 4) / 6`` blocks with widths 16k, 32k, 64k, and
a final BN-ReLU before pooling. Module names match RepDistiller's ``models/wrn.py``.
"""
from __future__ import annotations

import math

import torch.nn as nn
import torch.nn.functional as F

from kdray.models.registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.dropout = dropout
        self.equal_in_out = cin == cout
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x):
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        # an identity shortcut keeps the raw input; a projection sees the pre-activated one
        shortcut = x if self.equal_in_out else self.convShortcut(act)
        return out + shortcut


class NetworkBlock(nn.Module):
    """One group of blocks; the ``layer`` level exists only to match the checkpoints' key names."""

    def __init__(self, n: int, cin: int, cout: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(
            *[BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, dropout) for i in range(n)]
        )

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen_factor: int = 1, dropout: float = 0.0, num_classes: int = 100):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4 (10, 16, 22, 28, 40, ...); got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, dropout)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, dropout)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, dropout)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # = avg_pool2d(8) of the reference on 32x32 inputs
        self.fc = nn.Linear(widths[3], num_classes)
        self.nChannels = widths[3]
        # pre-activation stage outputs, as RepDistiller's feature list (f1..f3)
        self.kd_stages = ["block1", "block2", "block3"]
        self.kd_embedding = "avgpool"

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(self.avgpool(self.relu(self.bn1(x))).flatten(1))


def _register(name: str, depth: int, widen_factor: int):
    def build(num_classes: int = 100, depth: int = depth, widen_factor: int = widen_factor,
              dropout: float = 0.0) -> nn.Module:
        return WideResNet(depth, widen_factor, dropout, num_classes)

    build.__name__ = name
    build.__doc__ = f"WRN-{depth}-{widen_factor} (Zagoruyko & Komodakis, 2016)."
    register_model(name, family="wrn")(build)


for _d, _k in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _register(f"wrn_{_d}_{_k}", _d, _k)
