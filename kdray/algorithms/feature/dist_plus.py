"""Huang, You, Wang, Qian, Xu, "DIST+: Knowledge Distillation From a Stronger Adaptive Teacher" (TPAMI 2025)."""
from __future__ import annotations

import torch
import torch.nn as nn

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method
from kdray.algorithms.feature.connectors import not_built, pool_to_common
from kdray.algorithms.feature.point_choice import pick_pair
from kdray.algorithms.response.dist import pearson_distance, prediction_relations


@register_method
class DISTPlus(KnowledgeTerm):
    """DIST's two prediction relations plus two *feature* relations at one feature point::

        L = beta tau^2 L_inter + gamma tau^2 L_intra + iota L_channel + kappa L_spatial

    ``L_inter`` / ``L_intra`` are :class:`~kdray.algorithms.response.dist.DIST`'s (Pearson distance
    ``1 - rho`` of the softened predictions per sample / per class). On the feature maps ``F_s``, ``F_t``
    (``B x C x H x W``, the student's through a 1x1 conv onto the teacher's channels when they differ, the
    larger map average-pooled to the smaller):

    * **channel relation**: at every sample and position, ``1 - rho`` of the student's and the teacher's
      C-vectors (correlation over the channels), averaged over ``B x H x W``;
    * **spatial relation**: each map summed over its channels (``B x HW``, the student's own map, no
      connector needed), then per position ``1 - rho`` across the batch (DIST's intra-class form on
      positions), averaged over the ``HW`` positions.

    Source: torchdistill's ``DISTPlusLoss`` (2026; the paper itself was not available to us). One departure,
    deliberate: torchdistill adds the channel *correlation* ``rho`` itself to the loss, so minimising it
    pushes the student towards anti-correlation with the teacher; every other DIST/DIST+ relation is a
    distance ``1 - rho``, and kdray uses ``1 - rho`` here too (the same gradient up to sign). Its docstring
    also names ``kappa`` the channel weight while its code uses ``iota`` for channels and ``kappa`` for
    positions; kdray follows the code. Defaults: DIST's CIFAR-100 ``beta = gamma = 2``, ``tau = 4`` (as
    kdray's ``dist``), ``iota = kappa = 1`` (torchdistill's); no ``tau^2`` on the feature terms (as there).
    The hard-label CE is the distiller's (weight 1).
    """

    name = "dist_plus"
    kind = "feature"
    paper = "Huang, You, Wang, Qian, Xu 2025, DIST+: Knowledge Distillation From a Stronger Adaptive Teacher (TPAMI)"
    default_student_points = "stages"
    default_teacher_points = "stages"

    def __init__(self, beta: float = 2.0, gamma: float = 2.0, iota: float = 1.0, kappa: float = 1.0,
                 temperature: float = 4.0, feature_index: int = -1):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"dist_plus.temperature must be > 0, got {temperature}")
        if min(beta, gamma, iota, kappa) < 0:
            raise ValueError(f"dist_plus.beta, gamma, iota and kappa must be >= 0, got {beta}, {gamma}, {iota}, "
                             f"{kappa}")
        self.beta, self.gamma, self.iota, self.kappa = beta, gamma, iota, kappa
        self.temperature = temperature
        self.feature_index = feature_index
        self.connector: nn.Module | None = None

    def build(self, student: ModelOutput, teacher: ModelOutput, num_samples: int) -> None:
        pair = pick_pair(self, student, teacher, self.feature_index, need_map=True)
        s_c, t_c = pair.student.shape[1], pair.teacher.shape[1]
        conv = nn.Identity() if s_c == t_c else nn.Conv2d(s_c, t_c, kernel_size=1, bias=False)
        self.connector = conv.to(device=pair.student.device, dtype=pair.student.dtype)

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        if self.connector is None:
            raise not_built(self.name)
        if teacher.logits.shape != student.logits.shape:
            raise ValueError(f"dist_plus: student logits {tuple(student.logits.shape)} and teacher logits "
                             f"{tuple(teacher.logits.shape)} differ in shape (same batch and classes needed)")
        tau = self.temperature
        inter, intra = prediction_relations(student.logits, teacher.logits, tau)
        pair = pick_pair(self, student, teacher, self.feature_index, need_map=True)
        s, t = pool_to_common(self.connector(pair.student), pair.teacher)
        # channel relation: rows are (sample, position) pairs, columns the channels
        channel = pearson_distance(s.permute(0, 2, 3, 1).flatten(0, 2), t.permute(0, 2, 3, 1).flatten(0, 2))
        s_sum, t_sum = pool_to_common(pair.student.sum(1, keepdim=True), pair.teacher.sum(1, keepdim=True))
        spatial = pearson_distance(s_sum.flatten(1).t(), t_sum.flatten(1).t())
        return {"dist_plus_inter": self.beta * tau**2 * inter,
                "dist_plus_intra": self.gamma * tau**2 * intra,
                "dist_plus_channel": self.iota * channel,
                "dist_plus_spatial": self.kappa * spatial}
