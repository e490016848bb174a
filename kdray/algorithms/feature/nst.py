"""Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer" (2017)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method
from kdray.algorithms.feature.connectors import feature_pairs, pool_to_common

KERNELS = ("poly", "linear", "gaussian")


def _sq_dist(a: torch.Tensor, b: torch.Tensor, dot: torch.Tensor) -> torch.Tensor:
    """Squared distances from the Gram matrix (no ``cdist``: its gradient at distance 0 is not finite)."""
    return (a.pow(2).sum(-1)[:, :, None] + b.pow(2).sum(-1)[:, None, :] - 2 * dot).clamp_min(0)


@register_method
class NST(KnowledgeTerm):
    """Neuron selectivity transfer: match the distributions of the channels' spatial activation patterns.

    Each channel ``k`` of a ``(C, H, W)`` map gives one sample ``f^k`` in ``R^{HW}``, l2-normalised
    (as the paper does); the loss is the squared MMD between the teacher's ``C_T`` and the student's
    ``C_S`` samples::

        MMD^2 = 1/C_T^2 sum_{i,i'} k(f_T^i, f_T^i') + 1/C_S^2 sum_{j,j'} k(f_S^j, f_S^j')
                - 2/(C_T C_S) sum_{i,j} k(f_S^j, f_T^i)

    averaged over the batch and summed over the stage pairs, and the term is ``weight / 2 * MMD^2``
    (the paper's ``lambda / 2``). Kernels: ``poly`` ``(x.y + c)^d`` with the paper's ``d = 2, c = 0``
    (the default, the one RepDistiller / mdistiller implement), ``linear`` ``x.y``, and ``gaussian``
    ``exp(-||x - y||^2 / (2 sigma^2))`` with ``sigma^2`` the mean squared distance of the pairs
    (the paper's choice; treated as a constant).

    Followed from the paper where the implementations differ: RepDistiller / mdistiller omit the
    ``1/2`` (their weight 50 is our 100). Spatial mismatch: the larger map is adaptive-average-pooled
    to the smaller one (RepDistiller); the channel counts may differ.

    Default ``weight=50``: the RepDistiller / mdistiller CIFAR-100 weight.
    """

    name = "nst"
    kind = "feature"
    paper = "Huang, Wang 2017, Like What You Like: Knowledge Distill via Neuron Selectivity Transfer"
    default_student_points = "stages"
    default_teacher_points = "stages"

    def __init__(self, weight: float = 50.0, kernel: str = "poly", degree: int = 2, c: float = 0.0):
        super().__init__()
        if weight < 0:
            raise ValueError(f"nst.weight must be >= 0, got {weight}")
        if kernel not in KERNELS:
            raise ValueError(f"nst.kernel must be one of {KERNELS}, got {kernel!r}")
        if degree < 1:
            raise ValueError(f"nst.degree must be >= 1, got {degree}")
        self.weight = weight
        self.kernel = kernel
        self.degree = degree
        self.c = c

    def _gram(self, a: torch.Tensor, b: torch.Tensor, sigma2: torch.Tensor | None) -> torch.Tensor:
        """Kernel matrices ``(B, Ca, Cb)`` between the rows of ``a`` ``(B, Ca, D)`` and ``b`` ``(B, Cb, D)``."""
        dot = a @ b.transpose(1, 2)
        if self.kernel == "gaussian":
            return torch.exp(-_sq_dist(a, b, dot) / (2 * sigma2))
        if self.kernel == "linear":
            return dot
        return (dot + self.c).pow(self.degree)

    def mmd2(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-sample squared MMD ``(B,)`` between the normalised channel patterns of ``s`` and ``t``."""
        fs = F.normalize(s.flatten(2), dim=2)
        ft = F.normalize(t.flatten(2), dim=2)
        sigma2 = None
        if self.kernel == "gaussian":
            with torch.no_grad():
                d2 = torch.cat([_sq_dist(x, y, x @ y.transpose(1, 2)).flatten(1)
                                for x, y in ((fs, fs), (ft, ft), (fs, ft))], dim=1)
                sigma2 = d2.mean(dim=1).clamp_min(1e-12)[:, None, None]
        k_tt = self._gram(ft, ft, sigma2).mean(dim=(1, 2))
        k_ss = self._gram(fs, fs, sigma2).mean(dim=(1, 2))
        k_st = self._gram(fs, ft, sigma2).mean(dim=(1, 2))
        return k_tt + k_ss - 2 * k_st

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        total = 0.0
        for pair in feature_pairs(self, student, teacher):
            s, t = pool_to_common(pair.student, pair.teacher)
            total = total + self.mmd2(s, t).mean()
        return {"nst": self.weight / 2 * total}
