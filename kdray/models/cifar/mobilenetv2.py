"""MobileNetV2 for CIFAR (Sandler et al., 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks").

The KD benchmarks' student ("mobile_half" in RepDistiller, "MobileNetV2" in mdistiller) uses
width 0.5 and expansion T=6, with a stride-2 stem and stride 1 in the second stage so a 32x32
input ends at 2x2. Module names match RepDistiller's ``models/mobilenetv2.py``.
"""
from __future__ import annotations

import math

import torch.nn as nn

from kdray.models.registry import register_model


def _conv_bn_relu(cin: int, cout: int, k: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, 1x1 linear projection; residual when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = cin * expand_ratio
        self.use_res_connect = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 100, width_mult: float = 0.5, expand_ratio: int = 6):
        super().__init__()
        t = expand_ratio
        settings = [  # expansion, channels, repeats, first stride
            (1, 16, 1, 1), (t, 24, 2, 1), (t, 32, 3, 2), (t, 64, 4, 2),
            (t, 96, 3, 1), (t, 160, 3, 2), (t, 320, 1, 1),
        ]
        cin = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(3, cin, 3, 2)
        self.blocks = nn.ModuleList()
        for e, c, n, s in settings:
            cout = int(c * width_mult)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, e))
                cin = cout
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(cin, self.last_channel, 1, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # = AvgPool2d(2, ceil_mode) of the reference on 32x32
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        # RepDistiller's feature taps: end of the 24-, 32-, 96- and 320-channel stages
        self.kd_stages = ["blocks.1", "blocks.2", "blocks.4", "blocks.6"]
        self.kd_embedding = "avgpool"

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.conv1(x)
        for block in self.blocks:
            x = block(x)
        return self.classifier(self.avgpool(self.conv2(x)).flatten(1))


@register_model("mobilenetv2", family="mobilenetv2")
def mobilenetv2(num_classes: int = 100, width_mult: float = 0.5) -> nn.Module:
    """MobileNetV2, T=6; width 0.5 is the KD benchmarks' student (Sandler et al., 2018)."""
    return MobileNetV2(num_classes, width_mult)
