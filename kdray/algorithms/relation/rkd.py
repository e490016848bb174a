"""Park et al., "Relational Knowledge Distillation" (CVPR 2019)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method
from kdray.algorithms.relation.sp import paired_features


def distance_potential(e: torch.Tensor) -> torch.Tensor:
    """``psi_D`` over distinct pairs ``i != j``: ``||e_i - e_j||_2 / mu``, ``mu`` their mean (Eq. 4-5).

    Returned as the flat vector of the ``n (n - 1)`` off-diagonal entries.
    """
    n = e.shape[0]
    sq = e.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp_min(1e-12)
    off = ~torch.eye(n, dtype=torch.bool, device=e.device)
    d = d2[off].sqrt()
    return d / d.mean()


def angle_potential(e: torch.Tensor) -> torch.Tensor:
    """``psi_A(e_i, e_j, e_k) = <(e_i - e_j)/||.||, (e_k - e_j)/||.||>`` over distinct triplets (Eq. 6).

    Returned as the flat vector of the ``n (n - 1) (n - 2)`` entries with ``i, j, k`` all different
    (``j`` is the vertex of the angle).
    """
    n = e.shape[0]
    u = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)  # u[j, i] = unit(e_i - e_j)
    cos = u @ u.transpose(1, 2)  # cos[j, i, k]
    idx = torch.arange(n, device=e.device)
    distinct = (idx[:, None, None] != idx[None, :, None]) & (idx[:, None, None] != idx[None, None, :]) \
        & (idx[None, :, None] != idx[None, None, :])
    return cos[distinct]


@register_method
class RKD(KnowledgeTerm):
    """Relational KD: distance-wise and angle-wise potentials of the batch's embeddings, Huber loss.

    ``rkd_distance = weight * distance_weight * mean_{i != j} huber(psi_D^t - psi_D^s)`` and
    ``rkd_angle = weight * angle_weight * mean_{i,j,k distinct} huber(psi_A^t - psi_A^s)``, with the
    Huber loss at ``delta = 1`` (Eq. 3-7). Distances are divided by their mean over the batch, so
    only the *shape* of the teacher's embedding space is transferred, not its scale.

    Tuples are the paper's ``X^2`` / ``X^3``: pairs / triplets of *distinct* samples. The paper writes a
    sum over them; its authors' code (and RepDistiller, torchdistill) average, and the published
    weights were tuned with the average, so we average too — over the distinct tuples only, where
    those implementations also count the degenerate ``i = j`` (``i = k``, ``j = k``) entries in the mean.

    Published defaults (RepDistiller CIFAR-100): ``weight = 1`` with ``distance_weight = 25`` and
    ``angle_weight = 50`` inside (the paper's own are ``1`` and ``2``, for metric learning).
    Feature point: the penultimate embedding.
    """

    name = "rkd"
    kind = "relation"
    paper = "Park et al. 2019, Relational Knowledge Distillation (CVPR)"
    default_student_points = "embedding"
    default_teacher_points = "embedding"

    def __init__(self, weight: float = 1.0, distance_weight: float = 25.0, angle_weight: float = 50.0):
        super().__init__()
        self.weight = weight
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        dist = student.logits.new_zeros(())
        angle = student.logits.new_zeros(())
        for f_s, f_t in paired_features(self, student, teacher):
            s, t = f_s.flatten(1), f_t.flatten(1)
            if s.shape[0] < 3:
                raise ValueError(f"rkd needs a batch of at least 3 samples, got {s.shape[0]}")
            dist = dist + F.smooth_l1_loss(distance_potential(s), distance_potential(t), beta=1.0)
            angle = angle + F.smooth_l1_loss(angle_potential(s), angle_potential(t), beta=1.0)
        return {
            "rkd_distance": self.weight * self.distance_weight * dist,
            "rkd_angle": self.weight * self.angle_weight * angle,
        }
