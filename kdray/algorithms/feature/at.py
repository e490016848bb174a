"""Zagoruyko & Komodakis, "Paying More Attention to Attention" (ICLR 2017): activation-based AT."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method
from kdray.algorithms.feature.connectors import feature_pairs, pool_to_common


def attention_map(feature: torch.Tensor, p: float) -> torch.Tensor:
    """``Q = vec(sum_c |A_c|^p)`` l2-normalised per sample: ``(B, C, H, W) -> (B, H*W)`` (the paper's ``F^p_sum``)."""
    q = feature.abs().pow(p).sum(dim=1).flatten(1)
    return F.normalize(q, p=2, dim=1)


@register_method
class AT(KnowledgeTerm):
    """Activation-based attention transfer at every stage.

    For each pair ``j`` of points, ``Q_j = vec(F(A_j))`` with ``F(A) = sum_c |A_c|^p`` (``p = 2``,
    the paper's ``F^2_sum``), and the loss is the paper's attention-transfer loss::

        weight / 2 * sum_j  1/(H_j W_j) * mean_b || Q_S/||Q_S||_2 - Q_T/||Q_T||_2 ||_2

    i.e. ``beta = 10^3`` divided by the attention-map size and the batch size, per layer, as the paper
    sets it. Followed from the paper where the well-known code differs: the distance is
    the l2 *norm* of the difference (the authors' code, RepDistiller and mdistiller use the *squared*
    difference averaged over positions, without the ``1/2``), and ``|A|^p`` takes the absolute value
    (the code uses ``A^p``, the same for ``p = 2``). Summing or averaging over channels makes no
    difference after the normalisation.

    Spatial mismatch: the larger feature map is adaptive-average-pooled to the smaller one before
    the attention maps are taken (RepDistiller). Channels may differ freely (they are summed out).

    Default ``weight=1000``: the paper's ``beta`` and the RepDistiller / mdistiller CIFAR-100 weight.
    """

    name = "at"
    kind = "feature"
    paper = ("Zagoruyko, Komodakis 2017, Paying More Attention to Attention: Improving the Performance "
             "of Convolutional Neural Networks via Attention Transfer")
    default_student_points = "stages"
    default_teacher_points = "stages"

    def __init__(self, weight: float = 1000.0, p: float = 2.0):
        super().__init__()
        if weight < 0:
            raise ValueError(f"at.weight must be >= 0, got {weight}")
        if p <= 0:
            raise ValueError(f"at.p must be > 0, got {p}")
        self.weight = weight
        self.p = p

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        total = 0.0
        for pair in feature_pairs(self, student, teacher):
            s, t = pool_to_common(pair.student, pair.teacher)
            diff = attention_map(s, self.p) - attention_map(t, self.p)
            dist = torch.linalg.vector_norm(diff, ord=2, dim=1)  # (B,)
            total = total + dist.mean() / (s.shape[-2] * s.shape[-1])
        return {"at": self.weight / 2 * total}
