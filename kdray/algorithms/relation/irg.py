"""Liu et al., "Knowledge Distillation via Instance Relationship Graph" (CVPR 2019)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method
from kdray.algorithms.relation.sp import paired_features


def edge_matrix(features: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """IRG edges ``A(i, j) = ||f_i - f_j||_2^2`` over the batch, divided by their maximum."""
    f = features.flatten(1)
    sq = f.pow(2).sum(1)
    a = (sq[:, None] + sq[None, :] - 2 * f @ f.t()).clamp_min(0.0)
    a = a * (1 - torch.eye(a.shape[0], device=a.device, dtype=a.dtype))  # exact zeros on the diagonal
    return a / (a.max() + eps)


def _match(first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring two feature maps to a common shape: larger resolution average-pooled to the smaller, wider
    channel dimension average-pooled (groups of adjacent channels) to the narrower."""
    if first.dim() == 2:
        first = first[:, :, None, None]
    if second.dim() == 2:
        second = second[:, :, None, None]
    h, w = min(first.shape[2], second.shape[2]), min(first.shape[3], second.shape[3])
    first, second = F.adaptive_avg_pool2d(first, (h, w)), F.adaptive_avg_pool2d(second, (h, w))
    c = min(first.shape[1], second.shape[1])

    def reduce_channels(x):
        if x.shape[1] == c:
            return x
        b = x.shape[0]
        pooled = F.adaptive_avg_pool1d(x.flatten(2).transpose(1, 2).reshape(-1, 1, x.shape[1]), c)
        return pooled.reshape(b, h * w, c).transpose(1, 2).reshape(b, c, h, w)

    return reduce_channels(first), reduce_channels(second)


def transformation_vector(first: torch.Tensor, second: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """IRG vertex transformation ``Lambda(i) = ||f_l1(x_i) - f_l2(x_i)||_2^2``, divided by its maximum."""
    a, b = _match(first, second)
    lam = (a - b).flatten(1).pow(2).sum(1)
    return lam / (lam.max() + eps)


@register_method
class IRG(KnowledgeTerm):
    """Instance Relationship Graph: vertices (logits), edges (sample distances), transformations.

    The paper's multi-type knowledge loss (Eq. 8) without its CE (the distiller adds it):

    * ``irg_vertex = weight * vertex_weight * MSE(z_student, z_teacher)`` — vertex loss on the logits,
      the only layer where student and teacher features are directly comparable;
    * ``irg_edge = weight * edge_weight * mean_graphs MSE(A_teacher, A_student)`` — the ``n x n``
      squared-distance matrices of the batch at every matched feature point and at the logits;
    * ``irg_transform = weight * transform_weight * mean_pairs MSE(Lambda_teacher, Lambda_student)`` —
      how far each sample moves between consecutive feature points (the paper's vertex transformation;
      like the paper we drop the redundant, ``O(n^2)`` edge transformation). Maps of different shapes
      are average-pooled spatially and over groups of adjacent channels to a common shape.

    Edge matrices and transformation vectors are divided by their maximum over the batch, as in the
    authors' Caffe layers (``BatchEuclideanMap``) and the Knowledge-Distillation-Zoo port, so student
    and teacher scales need not agree. The paper writes sums (``sum_i``, ``||A_T - A_S||^2``, sum over
    graphs); we use means — over logit entries, matrix entries and graphs — because the default
    weights are those of the Knowledge-Distillation-Zoo PyTorch port (vertex ``0.1``, edge ``5``,
    transformation ``5``), which were set with means; the authors' Caffe prototxt uses a loss weight of
    ``0.005`` on a ``1/(2N)``-scaled sum for edges and transformations. The paper gives no CIFAR-100
    weights for the RepDistiller-style benchmark; tune them. Feature points: the model's stages.
    """

    name = "irg"
    kind = "relation"
    paper = "Liu et al. 2019, Knowledge Distillation via Instance Relationship Graph (CVPR)"
    default_student_points = "stages"
    default_teacher_points = "stages"

    def __init__(self, weight: float = 1.0, vertex_weight: float = 0.1, edge_weight: float = 5.0,
                 transform_weight: float = 5.0):
        super().__init__()
        self.weight = weight
        self.vertex_weight = vertex_weight
        self.edge_weight = edge_weight
        self.transform_weight = transform_weight

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        pairs = paired_features(self, student, teacher)
        vertex = F.mse_loss(student.logits, teacher.logits)
        graphs = pairs + [(student.logits, teacher.logits)]
        edge = sum(F.mse_loss(edge_matrix(f_s), edge_matrix(f_t)) for f_s, f_t in graphs) / len(graphs)
        out = {
            "irg_vertex": self.weight * self.vertex_weight * vertex,
            "irg_edge": self.weight * self.edge_weight * edge,
        }
        if len(pairs) >= 2:
            transform = sum(
                F.mse_loss(transformation_vector(pairs[k][0], pairs[k + 1][0]),
                           transformation_vector(pairs[k][1], pairs[k + 1][1]))
                for k in range(len(pairs) - 1)
            ) / (len(pairs) - 1)
            out["irg_transform"] = self.weight * self.transform_weight * transform
        return out
