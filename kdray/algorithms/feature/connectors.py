"""Shared plumbing of the feature methods: pairing feature points, reconciling shapes, connectors.

Every feature method compares the student's feature at its i-th point with the teacher's feature at
its i-th point. Features are 4-D maps ``(B, C, H, W)``; an embedding point may give ``(B, C, 1, 1)``
or ``(B, C)``, which is treated as a 1x1 map. Channel mismatch is the connectors' job (a 1x1 conv +
BN, or the method's own regressor); spatial mismatch is handled by adaptive average pooling of the
larger map down to the smaller one, per dimension (the RepDistiller / mdistiller convention). What
cannot be reconciled raises a ``ValueError`` naming both shapes and both module paths.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.algorithms.base import KnowledgeTerm, ModelOutput


@dataclass
class FeaturePair:
    """The student and teacher features at one pair of points, both as ``(B, C, H, W)`` maps."""

    index: int
    student_path: str
    teacher_path: str
    student: torch.Tensor
    teacher: torch.Tensor

    def describe(self) -> str:
        return (f"student feature {self.student_path!r} of shape {tuple(self.student.shape)} and "
                f"teacher feature {self.teacher_path!r} of shape {tuple(self.teacher.shape)}")


def shape_error(method: str, s_path: str, s: torch.Tensor, t_path: str, t: torch.Tensor,
                reason: str) -> ValueError:
    """A ``ValueError`` naming the method, both module paths and both shapes."""
    return ValueError(
        f"{method}: student feature {s_path!r} has shape {tuple(s.shape)} and teacher feature "
        f"{t_path!r} has shape {tuple(t.shape)}; {reason}"
    )


def as_map(x: torch.Tensor) -> torch.Tensor | None:
    """``(B, C, H, W)`` as is, ``(B, C)`` as ``(B, C, 1, 1)``; anything else gives ``None``."""
    if x.dim() == 4:
        return x
    if x.dim() == 2:
        return x[:, :, None, None]
    return None


def feature_pairs(term: KnowledgeTerm, student: ModelOutput, teacher: ModelOutput,
                  spatial: bool = True) -> list[FeaturePair]:
    """Pair ``term.student_points[i]`` with ``term.teacher_points[i]``, checking what can be checked.

    With ``spatial=True`` (methods that compare positions), a ``(B, C)`` vector paired with a map of
    more than one position is refused: it is almost surely a mis-chosen point, and pooling the map to
    one position would silently turn the method into something else.
    """
    s_points, t_points = list(term.student_points), list(term.teacher_points)
    if len(s_points) != len(t_points) or not s_points:
        raise ValueError(
            f"{term.name}: needs as many student as teacher feature points (and at least one); got "
            f"student {s_points} and teacher {t_points}; pass student_points / teacher_points of equal length"
        )
    pairs = []
    for i, (sp, tp) in enumerate(zip(s_points, t_points)):
        s_raw, t_raw = student.features[sp], teacher.features[tp]
        s, t = as_map(s_raw), as_map(t_raw)
        if s is None or t is None:
            raise shape_error(term.name, sp, s_raw, tp, t_raw,
                              "feature methods take (B, C, H, W) maps or (B, C) vectors")
        if s.shape[0] != t.shape[0]:
            raise shape_error(term.name, sp, s_raw, tp, t_raw, "the batch sizes differ")
        if spatial and (s_raw.dim() == 2) != (t_raw.dim() == 2):
            bigger = t if s_raw.dim() == 2 else s
            if bigger.shape[-2] * bigger.shape[-1] > 1:
                raise shape_error(term.name, sp, s_raw, tp, t_raw,
                                  "a vector cannot be matched with a spatial map; pick points of the same kind")
        pairs.append(FeaturePair(i, sp, tp, s, t))
    return pairs


def pool_to_common(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive-average-pool whichever map is larger (per dimension) to the smaller spatial size."""
    h, w = min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1])
    if tuple(s.shape[-2:]) != (h, w):
        s = F.adaptive_avg_pool2d(s, (h, w))
    if tuple(t.shape[-2:]) != (h, w):
        t = F.adaptive_avg_pool2d(t, (h, w))
    return s, t


def conv_bn(in_channels: int, out_channels: int, kernel_size: int = 1) -> nn.Sequential:
    """The standard connector: ``kernel_size`` conv (no bias) + BN, He-initialised, BN at identity."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=(kernel_size - 1) // 2, bias=False)
    fan_out = kernel_size * kernel_size * out_channels
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / fan_out))
    bn = nn.BatchNorm2d(out_channels)
    return nn.Sequential(conv, bn)


def not_built(method: str) -> RuntimeError:
    return RuntimeError(f"{method}: build() must run before the first forward (Distiller.build does it)")


class PhasedTerm(KnowledgeTerm):
    """A term that remembers the current epoch (``set_epoch``) for warm-ups and pre-training phases."""

    def __init__(self):
        super().__init__()
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._apply_phase()

    def _apply_phase(self) -> None:
        """Hook: freeze / unfreeze connectors for the current phase."""
