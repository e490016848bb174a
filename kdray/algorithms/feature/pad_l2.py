"""Zhang, Lan, Dai, Zeng, Bai, Chang, Wei, "Prime-Aware Adaptive Distillation" (ECCV 2020): PAD-L2."""
from __future__ import annotations

import torch
import torch.nn as nn

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method
from kdray.algorithms.feature.connectors import conv_bn, not_built, pool_to_common
from kdray.algorithms.feature.point_choice import pick_pair


@register_method
class PADL2(KnowledgeTerm):
    """PAD-L2: L2 feature matching, each sample weighted by a learned uncertainty (its variance).

    A variance head (a linear layer on the globally average-pooled student feature) predicts each
    sample's ``s_n = log sigma_n^2``; the loss is the Gaussian negative log-likelihood of the teacher's
    feature around the (aligned) student's::

        L = weight * 1/B * sum_n ( ||f_s^n - f_t^n||^2 / (2 sigma_n^2) + log sigma_n )

    ``||.||^2`` summed over the feature's elements. Samples the student matches badly get a large
    ``sigma`` and a small weight; ``log sigma`` keeps ``sigma`` from growing without bound; "prime"
    samples (small ``sigma``) dominate. The head starts at zero (``sigma = 1``: plain ``1/2 L2``).
    A public ``PADLoss`` instead predicts a per-*dimension* log-variance (Linear + BN) and drops both
    ``1/2``; we follow the paper's per-sample variance.

    Points: one pair, the penultimate embedding (``feature_index=-1``; the paper distils the final
    feature). Where the channel counts differ a 1x1 conv + BN connector maps the student's onto the
    teacher's (a kdray addition; equal counts: no connector). Spatial mismatch (map points): the
    larger map is adaptive-average-pooled to the smaller.

    Default ``weight=1`` (no loss weight for PAD-L2 alone is given that we could recover; it is the
    plain NLL).
    """

    name = "pad_l2"
    kind = "feature"
    paper = "Zhang, Lan, Dai, Zeng, Bai, Chang, Wei 2020, Prime-Aware Adaptive Distillation"
    default_student_points = "embedding"
    default_teacher_points = "embedding"

    def __init__(self, weight: float = 1.0, feature_index: int = -1):
        super().__init__()
        if weight < 0:
            raise ValueError(f"pad_l2.weight must be >= 0, got {weight}")
        self.weight = weight
        self.feature_index = feature_index
        self.connector: nn.Module | None = None
        self.log_variance: nn.Linear | None = None

    def build(self, student: ModelOutput, teacher: ModelOutput, num_samples: int) -> None:
        pair = pick_pair(self, student, teacher, self.feature_index)
        s_c, t_c = pair.student.shape[1], pair.teacher.shape[1]
        like = dict(device=pair.student.device, dtype=pair.student.dtype)
        self.connector = (nn.Identity() if s_c == t_c else conv_bn(s_c, t_c)).to(**like)
        self.log_variance = nn.Linear(s_c, 1).to(**like)
        nn.init.zeros_(self.log_variance.weight)
        nn.init.zeros_(self.log_variance.bias)

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        if self.connector is None or self.log_variance is None:
            raise not_built(self.name)
        pair = pick_pair(self, student, teacher, self.feature_index)
        s, t = pool_to_common(self.connector(pair.student), pair.teacher)
        log_var = self.log_variance(pair.student.mean(dim=(2, 3))).squeeze(1)  # (B,) = log sigma^2
        sq = (s - t).pow(2).flatten(1).sum(dim=1)
        nll = sq / (2 * log_var.exp()) + log_var / 2
        return {"pad_l2": self.weight * nll.mean()}
