"""Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction" (ICCV 2021)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method
from kdray.algorithms.feature.connectors import not_built, pool_to_common
from kdray.algorithms.feature.point_choice import pick_pair


@register_method
class CWD(KnowledgeTerm):
    """Channel-wise distillation: each channel's activations, softmaxed over the spatial positions, are
    a distribution the student matches in KL to the teacher's::

        phi(y_c)_i = exp(y_{c,i} / T) / sum_j exp(y_{c,j} / T)          (i, j: the H*W positions)
        L = weight * T^2 / (B * C) * sum_b sum_c sum_i phi(y^T_c)_i * log(phi(y^T_c)_i / phi(y^S_c)_i)

    i.e. ``KL(teacher || student)`` summed over positions, averaged over channels and the batch, times
    ``T^2`` (the paper's Eq. and mmrazor's ``ChannelWiseDivergence``, which agree).

    Channels: when the student's channel count differs from the teacher's a 1x1 convolution (with bias)
    maps it onto the teacher's (the paper aligns channels with a 1x1 conv); otherwise the student map is
    used as is (no parameters). Spatial mismatch: the larger map is adaptive-average-pooled to the smaller.

    Points: one pair, the last stage (``feature_index=-1``); the paper distils the last feature map / the
    logit maps of a dense-prediction head. Defaults ``temperature=4``, ``weight=3``: the paper's
    segmentation values (there is no published classification setting; we keep these and say so).
    """

    name = "cwd"
    kind = "feature"
    paper = "Shu, Liu, Gao, Yan, Shen 2021, Channel-wise Knowledge Distillation for Dense Prediction"
    default_student_points = "stages"
    default_teacher_points = "stages"

    def __init__(self, weight: float = 3.0, temperature: float = 4.0, feature_index: int = -1):
        super().__init__()
        if weight < 0:
            raise ValueError(f"cwd.weight must be >= 0, got {weight}")
        if temperature <= 0:
            raise ValueError(f"cwd.temperature must be > 0, got {temperature}")
        self.weight = weight
        self.temperature = temperature
        self.feature_index = feature_index
        self.connector: nn.Module | None = None

    def build(self, student: ModelOutput, teacher: ModelOutput, num_samples: int) -> None:
        pair = pick_pair(self, student, teacher, self.feature_index)
        s_c, t_c = pair.student.shape[1], pair.teacher.shape[1]
        conv = nn.Identity() if s_c == t_c else nn.Conv2d(s_c, t_c, kernel_size=1)
        self.connector = conv.to(device=pair.student.device, dtype=pair.student.dtype)

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        if self.connector is None:
            raise not_built(self.name)
        pair = pick_pair(self, student, teacher, self.feature_index)
        s, t = pool_to_common(self.connector(pair.student), pair.teacher)
        b, c = t.shape[:2]
        tau = self.temperature
        log_p_s = F.log_softmax(s.flatten(2) / tau, dim=2)
        log_p_t = F.log_softmax(t.flatten(2) / tau, dim=2)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
        return {"cwd": self.weight * tau ** 2 * kl / (b * c)}
