"""Yim et al., "A Gift from Knowledge Distillation: Fast Optimization, Network Minimization and
Transfer Learning" (CVPR 2017)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method
from kdray.algorithms.relation.sp import paired_features


def as_map(f: torch.Tensor) -> torch.Tensor:
    """A ``(B, C, H, W)`` view of a feature: vectors ``(B, C)`` become ``(B, C, 1, 1)``."""
    return f if f.dim() == 4 else f.reshape(f.shape[0], f.shape[1], 1, 1)


def fsp_matrix(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``G_ij = sum_{s,t} F1_{s,t,i} F2_{s,t,j} / (h w)`` (Eq. 1), shape ``(B, C1, C2)``.

    When the two maps differ in resolution the larger one is average-pooled to the smaller
    (RepDistiller does the same; torchdistill max-pools).
    """
    first, second = as_map(first), as_map(second)
    h, w = min(first.shape[2], second.shape[2]), min(first.shape[3], second.shape[3])
    if first.shape[2:] != (h, w):
        first = F.adaptive_avg_pool2d(first, (h, w))
    if second.shape[2:] != (h, w):
        second = F.adaptive_avg_pool2d(second, (h, w))
    return first.flatten(2) @ second.flatten(2).transpose(1, 2) / (h * w)


@register_method
class FSP(KnowledgeTerm):
    """Flow of Solution Procedure: match the teacher's FSP matrices between consecutive feature points.

    ``fsp = weight * sum_pairs mean_{batch, i, j} (G_teacher - G_student)_ij^2`` where ``G`` (Eq. 1,
    ``G_ij = sum_{s,t} F1_{s,t,i} F2_{s,t,j} / (h w)``) is the Gram matrix between the channels of a
    section's *input* and *output* maps. With the default ``"stages"`` points the pairs are consecutive
    stage outputs: stage ``k``'s output is stage ``k+1``'s input, so each pair is a stage's
    (input, output); when their resolutions differ (the stage has a stride) the larger map is
    average-pooled to the smaller, as RepDistiller does (the paper picks points of equal size).

    Reduction — a deliberate departure from the paper: Eq. 2 is ``1/N sum_x sum_i lambda_i ||G_T - G_S||_2^2``
    with equal ``lambda_i``, i.e. the squared Frobenius norm *summed* over the ``C1 x C2`` entries. We
    average over the entries, as RepDistiller does (equivalently ``lambda_i = 1 / (C1 C2)``). With the sum,
    the published weight 50 makes the loss thousands of times the CE (``C1 C2`` is 512 already on the
    digits CNN, ~8k-33k on CIFAR ResNets) and the short digits training diverged (loss ~5e13 after one
    epoch); with the mean it starts at a few units and trains.

    The paper assumes the teacher and student share channel counts at the matched points (RepDistiller
    raises otherwise). When they differ, a 1x1 convolution per student point maps its channels to the
    teacher's before the FSP matrix — these connectors are trained with the student.

    Schedule: the paper trains in two stages, first the FSP loss alone, then the main task alone
    (RepDistiller: 30 such ``init`` epochs, then CE only, so its ``-b 50`` is in fact never applied). With
    ``init_epochs = N > 0`` this term reproduces that: for the first ``N`` epochs the distiller drops the
    hard-label CE and only FSP trains, afterwards the FSP loss is switched off. The default
    ``init_epochs = 0`` instead adds FSP to the CE for the whole run, with RepDistiller's published
    CIFAR-100 weight ``50``.
    """

    name = "fsp"
    kind = "relation"
    paper = "Yim et al. 2017, A Gift from Knowledge Distillation: Fast Optimization, Network Minimization " \
            "and Transfer Learning (CVPR)"
    default_student_points = "stages"
    default_teacher_points = "stages"

    def __init__(self, weight: float = 50.0, init_epochs: int = 0):
        super().__init__()
        if init_epochs < 0:
            raise ValueError(f"fsp.init_epochs must be >= 0, got {init_epochs}")
        self.weight = weight
        self.init_epochs = init_epochs
        self.epoch = 0
        self.connectors = nn.ModuleDict()

    def build(self, student: ModelOutput, teacher: ModelOutput, num_samples: int) -> None:
        pairs = paired_features(self, student, teacher)
        if len(pairs) < 2:
            raise ValueError(f"fsp needs at least two feature points (consecutive pairs), got "
                             f"{self.student_points}")
        for i, (f_s, f_t) in enumerate(pairs):
            c_s, c_t = as_map(f_s).shape[1], as_map(f_t).shape[1]
            if c_s != c_t:
                self.connectors[str(i)] = nn.Conv2d(c_s, c_t, kernel_size=1, bias=False).to(device=f_s.device,
                                                                                             dtype=f_s.dtype)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def uses_hard_labels(self) -> bool:
        return self.epoch >= self.init_epochs

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        pairs = paired_features(self, student, teacher)
        s_maps, t_maps = [], []
        for i, (f_s, f_t) in enumerate(pairs):
            f_s = as_map(f_s)
            if str(i) in self.connectors:
                f_s = self.connectors[str(i)](f_s)
            s_maps.append(f_s)
            t_maps.append(f_t)
        loss = student.logits.new_zeros(())
        for k in range(len(pairs) - 1):
            g_s = fsp_matrix(s_maps[k], s_maps[k + 1])
            g_t = fsp_matrix(t_maps[k], t_maps[k + 1])
            loss = loss + (g_t - g_s).pow(2).mean()
        if self.init_epochs and self.epoch >= self.init_epochs:
            loss = loss * 0.0  # stage two: main task only (kept in the graph so DDP sees every connector)
        return {"fsp": self.weight * loss}
