"""VGG with batch norm for CIFAR (Simonyan & Zisserman, 2015, "Very Deep Convolutional Networks").

As in the KD benchmarks the fully connected head is replaced by global pooling and one linear
layer, and the convolutions are grouped in five blocks whose last BN is left un-activated (so
pre-activation features are available). Module names match RepDistiller's ``models/vgg.py``
(the ``*_bn`` builders, which its ``vgg8``/``vgg13``/... names point to).
"""
from __future__ import annotations

import math

import torch.nn as nn

from kdray.models.registry import register_model

_CFGS = {
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    19: [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _block(widths: list[int], cin: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        cin = w
    return nn.Sequential(*layers[:-1])  # the activation is applied outside, by relu{i}


class VGG(nn.Module):
    def __init__(self, cfg: list[list[int]], num_classes: int = 100):
        super().__init__()
        cin = 3
        for i, widths in enumerate(cfg):
            self.add_module(f"block{i}", _block(widths, cin))
            cin = widths[-1]
        # separate, not in-place activations: each is a hookable post-ReLU stage output
        for i in range(5):
            self.add_module(f"relu{i}", nn.ReLU())
        for i in range(4):
            self.add_module(f"pool{i}", nn.MaxPool2d(2, 2))
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)
        self.kd_stages = ["relu1", "relu2", "relu3", "relu4"]
        self.kd_embedding = "pool4"

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        # four 2x poolings would leave 2x2 maps on 32x32 inputs; the reference skips pool3 there
        # and uses it only for 64x64 inputs (Tiny-ImageNet), so block4 runs at 4x4 on CIFAR
        use_pool3 = x.shape[2] == 64
        x = self.pool0(self.relu0(self.block0(x)))
        x = self.pool1(self.relu1(self.block1(x)))
        x = self.pool2(self.relu2(self.block2(x)))
        x = self.relu3(self.block3(x))
        if use_pool3:
            x = self.pool3(x)
        x = self.relu4(self.block4(x))
        return self.classifier(self.pool4(x).flatten(1))


def _register(depth: int):
    name = f"vgg{depth}"

    def build(num_classes: int = 100, width_mult: float = 1.0) -> nn.Module:
        cfg = [[max(1, int(round(w * width_mult))) for w in block] for block in _CFGS[depth]]
        return VGG(cfg, num_classes)

    build.__name__ = name
    build.__doc__ = f"VGG-{depth} with batch norm for 32x32 inputs (Simonyan & Zisserman, 2015)."
    register_model(name, family="vgg")(build)


for _depth in _CFGS:
    _register(_depth)
