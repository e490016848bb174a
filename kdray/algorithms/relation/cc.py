"""Peng et al., "Correlation Congruence for Knowledge Distillation" (ICCV 2019)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method
from kdray.algorithms.relation.sp import paired_features


def taylor_rbf_correlation(features: torch.Tensor, gamma: float, order: int) -> torch.Tensor:
    """``psi(F)``: the ``n x n`` Gaussian-RBF correlation of L2-normalised embeddings, by Taylor series.

    ``k(f_i, f_j) = exp(-gamma ||f_i - f_j||^2) = exp(-2 gamma) exp(2 gamma f_i.f_j)`` for unit vectors,
    expanded to order ``P``: ``sum_{p=0..P} exp(-2 gamma) (2 gamma)^p / p! (f_i.f_j)^p`` (paper, sec. 3.3).
    """
    f = F.normalize(features.flatten(1), p=2, dim=1)
    dots = f @ f.t()
    out = torch.zeros_like(dots)
    for p in range(order + 1):
        out = out + (2 * gamma) ** p / math.factorial(p) * dots.pow(p)
    return math.exp(-2 * gamma) * out


@register_method
class CC(KnowledgeTerm):
    """Correlation congruence: ``weight / n^2 * ||psi(F_teacher) - psi(F_student)||_2^2`` (Eq. 7-8).

    ``psi`` is the ``n x n`` correlation matrix of the batch's penultimate embeddings under a Gaussian
    RBF kernel approximated by its order-``P`` Taylor series (paper defaults ``P = 2``,
    ``gamma = 0.4``), so it compares *relations between samples* and needs no connector: student and
    teacher embeddings may have different widths. The Taylor form equals the RBF kernel only for
    unit-norm features, which the derivation assumes, so embeddings are L2-normalised first.
    The paper's total loss adds CE (the distiller's) and optionally Hinton KD (add the ``kd`` term).

    RepDistiller does something else: trainable linear embeddings (plus L2 norm) on both sides and
    ``mean_i sum_d |f_s - f_t|_i,d * |f_s - f_t|_{i+1},d`` — a product of the per-sample differences of
    *consecutive* samples — which is not the paper's kernel; torchdistill uses the kernel on linear
    projections without normalisation and an unsquared norm. We follow the paper.

    Default ``weight = 0.02``: RepDistiller's published CIFAR-100 weight for CC (tuned for its own
    loss, whose scale differs from the paper's; tune ``weight`` if the term is too weak).
    """

    name = "cc"
    kind = "relation"
    paper = "Peng et al. 2019, Correlation Congruence for Knowledge Distillation (ICCV)"
    default_student_points = "embedding"
    default_teacher_points = "embedding"

    def __init__(self, weight: float = 0.02, gamma: float = 0.4, order: int = 2):
        super().__init__()
        if gamma <= 0:
            raise ValueError(f"cc.gamma must be > 0, got {gamma}")
        if order < 0:
            raise ValueError(f"cc.order must be >= 0, got {order}")
        self.weight = weight
        self.gamma = gamma
        self.order = order

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        loss = student.logits.new_zeros(())
        for f_s, f_t in paired_features(self, student, teacher):
            n = f_s.shape[0]
            psi_s = taylor_rbf_correlation(f_s, self.gamma, self.order)
            psi_t = taylor_rbf_correlation(f_t, self.gamma, self.order)
            loss = loss + (psi_t - psi_s).pow(2).sum() / n**2
        return {"cc": self.weight * loss}
