"""Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer" (ECCV 2018)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method
from kdray.algorithms.feature.connectors import feature_pairs


def conditional_probabilities(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``P[i, j] = p_{j|i}`` from the cosine kernel ``K = (cos + 1) / 2``, excluding ``j = i`` (as in the paper)."""
    x = F.normalize(x, dim=1, eps=eps)
    k = (x @ x.t() + 1.0) / 2.0
    off_diagonal = 1.0 - torch.eye(x.shape[0], device=x.device, dtype=x.dtype)
    k = k * off_diagonal
    return k / k.sum(dim=1, keepdim=True).clamp_min(eps)


@register_method
class PKT(KnowledgeTerm):
    """Probabilistic knowledge transfer: match the batch's pairwise-affinity distributions.

    With the cosine-similarity kernel ``K(a, b) = (a.b / (|a| |b|) + 1) / 2`` (the paper's choice,
    free of a bandwidth), each sample ``i`` of the batch gets a conditional distribution over the
    *other* samples, ``p_{j|i} = K(x_i, x_j) / sum_{k != i} K(x_i, x_k)``, for the teacher (``p``)
    and the student (``q``); the loss is ``KL(p || q)``::

        weight * 1/(N(N-1)) * sum_i sum_{j != i} p_{j|i} log(p_{j|i} / q_{j|i})

    Followed from the paper where the authors' code (and RepDistiller / mdistiller, which copy it)
    differ: the self-affinity ``j = i`` is excluded from the distributions; the code keeps it. The
    paper sums over the pairs; we average over the ``N(N-1)`` pairs, which keeps the published
    weight's scale (the code averages over ``N^2`` entries) and makes the loss independent of the
    batch size. Student and teacher dimensions may differ (only affinities are compared).
    A batch of one sample has no pairs and gives a zero loss.

    Points: the penultimate embedding (``kd_embedding``), flattened. Default ``weight=30000``:
    the RepDistiller / mdistiller CIFAR-100 weight.
    """

    name = "pkt"
    kind = "feature"
    paper = "Passalis, Tefas 2018, Learning Deep Representations with Probabilistic Knowledge Transfer"
    default_student_points = "embedding"
    default_teacher_points = "embedding"

    def __init__(self, weight: float = 30000.0, eps: float = 1e-7):
        super().__init__()
        if weight < 0:
            raise ValueError(f"pkt.weight must be >= 0, got {weight}")
        if eps <= 0:
            raise ValueError(f"pkt.eps must be > 0, got {eps}")
        self.weight = weight
        self.eps = eps

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        total = 0.0
        for pair in feature_pairs(self, student, teacher, spatial=False):
            s, t = pair.student.flatten(1), pair.teacher.flatten(1)
            n = s.shape[0]
            if n < 2:
                total = total + 0.0 * s.sum()
                continue
            q = conditional_probabilities(s, self.eps)
            p = conditional_probabilities(t, self.eps)
            kl = p * (torch.log(p.clamp_min(self.eps)) - torch.log(q.clamp_min(self.eps)))
            total = total + kl.sum() / (n * (n - 1))
        return {"pkt": self.weight * total}
