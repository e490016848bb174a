"""Touvron et al., "Training data-efficient image transformers & distillation through attention" (ICML 2021)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method
from kdray.algorithms.response.kd import kl_div_with_temperature

VARIANTS = ("hard", "soft")


@register_method
class DeiT(KnowledgeTerm):
    """DeiT distillation: the class head learns the labels, the distillation head the teacher.

    ``(1 - alpha) * CE(cls, y) + alpha * D(dist, teacher)`` with, for ``variant``:

    * ``hard`` (the paper's best): ``D = CE(dist, argmax teacher)``, ``alpha = 0.5`` (the paper's 1/2, 1/2);
    * ``soft``: ``D = T^2 * KL(softmax(teacher / T) || softmax(dist / T))``.

    ``dist`` is the distillation head's logits: the student's feature point given as ``student_points``
    (``[head_dist]`` for ``deit_vit``, whose eval-mode logits then average both heads' softmaxes, the
    paper's inference). Without a point the class head is used for both parts: the paper's distillation of a
    model without a distillation token. kdray's soft KL is ``batchmean``; the official code divides the summed
    KL by batch x classes (a 1/classes smaller weight). Paper defaults: ``alpha = 0.5``, ``T = 1``.
    """

    name = "deit"
    kind = "response"
    paper = "Touvron et al. 2021, Training data-efficient image transformers & distillation through attention"
    provides_ce = True

    def __init__(self, variant: str = "hard", alpha: float = 0.5, temperature: float = 1.0):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"deit.variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"deit.alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"deit.temperature must be > 0, got {temperature}")
        self.variant = variant
        self.alpha = alpha
        self.temperature = temperature

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        if len(self.student_points) > 1:
            raise ValueError(f"deit reads one distillation head, got student_points {self.student_points}")
        dist = student.features[self.student_points[0]] if self.student_points else student.logits
        if self.variant == "hard":
            kd = F.cross_entropy(dist, teacher.logits.argmax(dim=1))
        else:
            kd = kl_div_with_temperature(dist, teacher.logits, self.temperature)
        return {"ce": (1 - self.alpha) * F.cross_entropy(student.logits, batch.targets), "deit": self.alpha * kd}
