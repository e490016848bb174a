"""Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge Review" (CVPR 2021)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.algorithms.base import Batch, ModelOutput, register_method
from kdray.algorithms.feature.connectors import PhasedTerm, feature_pairs, not_built


class ABF(nn.Module):
    """Attention-based fusion (the paper's ABF): reduce the student's feature, fuse it with the residual
    from the deeper level through two spatial attention maps, and project to the teacher's channels."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.project = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.attention = (
            nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        )
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)
        nn.init.kaiming_uniform_(self.project[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None,
                out_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output at out_size with the teacher's channels, residual for the next shallower level)``."""
        x = self.reduce(x)
        if self.attention is not None:
            residual = F.interpolate(residual, size=tuple(x.shape[-2:]), mode="nearest")
            z = self.attention(torch.cat([x, residual], dim=1))
            x = x * z[:, 0:1] + residual * z[:, 1:2]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.project(x), x


def hierarchical_context_loss(fs: torch.Tensor, ft: torch.Tensor, levels: tuple[int, ...]) -> torch.Tensor:
    """Hierarchical context loss (the paper's HCL): MSE at full size plus MSEs of ``l x l`` pooled
    maps (for each ``l`` smaller than the map), weighted 1, 1/2, 1/4, ..., normalised by the weights' sum."""
    loss = F.mse_loss(fs, ft)
    weight, total = 1.0, 1.0
    for level in levels:
        if level >= min(fs.shape[-2], fs.shape[-1]):
            continue
        weight /= 2.0
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, level), F.adaptive_avg_pool2d(ft, level))
        total += weight
    return loss / total


@register_method
class ReviewKD(PhasedTerm):
    """Knowledge review: every teacher level is matched by a fusion of the student's same *and deeper* levels.

    Points: the stages plus the pooled embedding, shallow to deep, for both networks (mdistiller's
    ``feats + pooled_feat``). The student's levels are processed deepest first by a residual chain of
    ABF modules (mid width ``min(max_mid_channels, C_deepest)``); the output at level ``i`` has the
    teacher's channels and spatial size (nearest interpolation) and is compared with the teacher's
    level ``i`` by the hierarchical context loss (pyramid ``levels = (4, 2, 1)``)::

        weight * min((epoch + 1) / warmup_epochs, 1) * sum_i HCL(ABF_i(S_i, ..., S_n), T_i)

    The warm-up is mdistiller's linear ramp over ``warmup_epochs = 20`` (its epochs count from 1; ours
    from 0, hence ``epoch + 1``). mdistiller distils the teacher's *pre-ReLU* stage features; the
    default ``stages`` points of our models are post-ReLU - point the teacher at pre-ReLU modules for
    that setting. Student and teacher need the same number of levels (``ValueError`` otherwise);
    spatial sizes may differ freely.

    Default ``weight=1``: mdistiller's default REVIEWKD_WEIGHT (its resnet32x4 -> resnet8x4 config
    uses 5).
    """

    name = "reviewkd"
    kind = "feature"
    paper = "Chen, Liu, Zhao, Jia 2021, Distilling Knowledge via Knowledge Review"
    default_student_points = ["stages", "embedding"]
    default_teacher_points = ["stages", "embedding"]

    def __init__(self, weight: float = 1.0, warmup_epochs: int = 20, max_mid_channels: int = 512,
                 levels: tuple[int, ...] = (4, 2, 1)):
        super().__init__()
        if weight < 0:
            raise ValueError(f"reviewkd.weight must be >= 0, got {weight}")
        if warmup_epochs < 0:
            raise ValueError(f"reviewkd.warmup_epochs must be >= 0, got {warmup_epochs}")
        if max_mid_channels < 1:
            raise ValueError(f"reviewkd.max_mid_channels must be >= 1, got {max_mid_channels}")
        if any(int(level) < 1 for level in levels):
            raise ValueError(f"reviewkd.levels must be positive sizes, got {levels}")
        self.weight = weight
        self.warmup_epochs = warmup_epochs
        self.max_mid_channels = max_mid_channels
        self.levels = tuple(int(level) for level in levels)
        self.abfs: nn.ModuleList | None = None

    def warmup_factor(self) -> float:
        if self.warmup_epochs == 0:
            return 1.0
        return min((self.epoch + 1) / self.warmup_epochs, 1.0)

    def _pairs(self, student: ModelOutput, teacher: ModelOutput):
        s_points, t_points = list(self.student_points), list(self.teacher_points)
        if len(s_points) != len(t_points):
            s_shapes = [tuple(student.features[p].shape) for p in s_points]
            t_shapes = [tuple(teacher.features[p].shape) for p in t_points]
            raise ValueError(
                f"reviewkd: knowledge review needs as many student as teacher levels; got student "
                f"{s_points} of shapes {s_shapes} and teacher {t_points} of shapes {t_shapes}; pass "
                f"student_points / teacher_points of equal length"
            )
        return feature_pairs(self, student, teacher, spatial=False)

    def build(self, student: ModelOutput, teacher: ModelOutput, num_samples: int) -> None:
        pairs = self._pairs(student, teacher)
        mid = min(self.max_mid_channels, pairs[-1].student.shape[1])
        last = len(pairs) - 1
        self.abfs = nn.ModuleList(
            ABF(p.student.shape[1], mid, p.teacher.shape[1], fuse=p.index < last).to(
                device=p.student.device, dtype=p.student.dtype)
            for p in pairs
        )

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        if self.abfs is None:
            raise not_built(self.name)
        pairs = self._pairs(student, teacher)
        residual = None
        total = 0.0
        for pair in reversed(pairs):
            out, residual = self.abfs[pair.index](pair.student, residual, tuple(pair.teacher.shape[-2:]))
            total = total + hierarchical_context_loss(out, pair.teacher, self.levels)
        return {"reviewkd": self.weight * self.warmup_factor() * total}
