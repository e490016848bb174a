"""Small networks for scikit-learn's 8x8 ``digits``: the embedded default job and the fast tests.

The CNN has two convolutional stages so that feature- and relation-based methods have spatial
maps to match; the MLP is the tiny student for which distillation visibly matters.
"""
from __future__ import annotations

import torch.nn as nn

from kdray.models.registry import register_model


class DigitsMLP(nn.Module):
    """``depth`` hidden layers of ``hidden`` units on the flattened 8x8 image."""

    def __init__(self, num_classes: int = 10, hidden: int = 32, depth: int = 1, in_channels: int = 1):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_channels * 64
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)
        self.kd_stages = [f"body.{2 * i + 2}" for i in range(depth)]
        self.kd_embedding = "body"

    def forward(self, x):
        return self.fc(self.body(x))


class VectorMLP(nn.Module):
    """``depth`` hidden layers of ``hidden`` units on a flat ``in_features`` vector (e.g. the 16-feature
    ``profile`` modality of ``digits_two_views``); ``kd_embedding`` is the last hidden layer."""

    def __init__(self, num_classes: int = 10, in_features: int = 16, hidden: int = 64, depth: int = 2):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)
        self.kd_stages = [f"body.{2 * i + 1}" for i in range(depth)]
        self.kd_embedding = "body"

    def forward(self, x):
        return self.fc(self.body(x.flatten(1)))


class DigitsCNN(nn.Module):
    """Two conv stages (8x8 -> 4x4 -> 2x2) with ``width`` and ``2*width`` channels, then a linear head."""

    def __init__(self, num_classes: int = 10, width: int = 16, in_channels: int = 1):
        super().__init__()

        def stage(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )

        self.stage1 = stage(in_channels, width)
        self.stage2 = stage(width, 2 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)
        self.kd_stages = ["stage1", "stage2"]
        self.kd_embedding = "pool"

    def forward(self, x):
        return self.fc(self.pool(self.stage2(self.stage1(x))).flatten(1))


@register_model("digits_mlp", family="digits")
def digits_mlp(num_classes: int = 10, hidden: int = 32, depth: int = 1, in_channels: int = 1):
    return DigitsMLP(num_classes, hidden, depth, in_channels)


@register_model("digits_cnn", family="digits")
def digits_cnn(num_classes: int = 10, width: int = 16, in_channels: int = 1):
    return DigitsCNN(num_classes, width, in_channels)


@register_model("vector_mlp", family="digits")
def vector_mlp(num_classes: int = 10, in_features: int = 16, hidden: int = 64, depth: int = 2):
    return VectorMLP(num_classes, in_features, hidden, depth)
