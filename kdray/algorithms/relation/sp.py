"""Tung & Mori, "Similarity-Preserving Knowledge Distillation" (ICCV 2019)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method


def paired_features(term: KnowledgeTerm, student: ModelOutput, teacher: ModelOutput):
    """``[(student_feature, teacher_feature), ...]`` in point order; the two lists must match in length."""
    if len(term.student_points) != len(term.teacher_points):
        raise ValueError(f"{term.name}: {len(term.student_points)} student feature points "
                         f"{term.student_points} but {len(term.teacher_points)} teacher points "
                         f"{term.teacher_points}; give as many of each")
    return [(student.features[s], teacher.features[t]) for s, t in zip(term.student_points, term.teacher_points)]


def similarity_matrix(features: torch.Tensor) -> torch.Tensor:
    """``G~ = row_l2_normalise(Q Q^T)`` with ``Q`` the batch's features flattened to ``(b, chw)`` (Eq. 1-2)."""
    q = features.flatten(1)
    return F.normalize(q @ q.t(), p=2, dim=1)


@register_method
class SP(KnowledgeTerm):
    """Similarity-preserving KD: ``weight / b^2 * ||G~_teacher - G~_student||_F^2`` (Eq. 3-4).

    ``G~`` is the row-normalised ``b x b`` Gram matrix of a mini-batch's activations at a layer, so
    student and teacher need not share channels or resolution: what is transferred is which samples
    the teacher finds similar. The paper sums this over chosen layer pairs; its CIFAR experiments —
    and RepDistiller — use the output of the last stage only, which is what ``layers="last"``
    (default) does with the default ``"stages"`` points; ``layers="all"`` sums over every stage pair.
    RepDistiller's implementation matches the paper (row-wise L2 normalisation, ``1/b^2``).

    Published CIFAR-100 weight (paper's gamma and RepDistiller's ``-b``): ``3000``.
    """

    name = "sp"
    kind = "relation"
    paper = "Tung & Mori 2019, Similarity-Preserving Knowledge Distillation (ICCV)"
    default_student_points = "stages"
    default_teacher_points = "stages"

    def __init__(self, weight: float = 3000.0, layers: str = "last"):
        super().__init__()
        if layers not in ("last", "all"):
            raise ValueError(f"sp.layers must be 'last' or 'all', got {layers!r}")
        self.weight = weight
        self.layers = layers

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        pairs = paired_features(self, student, teacher)
        if self.layers == "last":
            pairs = pairs[-1:]
        loss = student.logits.new_zeros(())
        for f_s, f_t in pairs:
            b = f_s.shape[0]
            loss = loss + (similarity_matrix(f_t) - similarity_matrix(f_s)).pow(2).sum() / b**2
        return {"sp": self.weight * loss}
