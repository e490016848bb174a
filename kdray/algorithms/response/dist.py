"""Huang et al., "Knowledge Distillation from A Stronger Teacher" (DIST, NeurIPS 2022)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method


def pearson_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``1 - rho(a_i, b_i)`` averaged over the rows ``i``: Pearson's correlation of each row of ``a`` with the
    same row of ``b`` (both centred over the row, then cosine similarity; ``eps`` guards a constant row, whose
    correlation counts as 0)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    rho = (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(eps)
    return 1 - rho.mean()


def prediction_relations(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DIST's ``(L_inter, L_intra)`` of the predictions softened at ``tau`` (without the ``tau^2``): the Pearson
    distance per sample (rows) and per class (columns)."""
    y_s = F.softmax(student_logits / tau, dim=1)
    y_t = F.softmax(teacher_logits / tau, dim=1)
    return pearson_distance(y_s, y_t), pearson_distance(y_s.t(), y_t.t())


@register_method
class DIST(KnowledgeTerm):
    """DIST: match *relations* of the predictions, not the predictions: ``beta * L_inter + gamma * L_intra``.

    With ``Y_s = softmax(z_s / tau)`` and ``Y_t = softmax(z_t / tau)`` (``B x K``) and
    ``d_p(u, v) = 1 - rho_p(u, v)`` the Pearson distance (``rho_p = Cov(u, v) / (Std(u) Std(v))``):

    * **inter-class relation** (Eq. 6): ``1/B sum_i d_p(Y_s[i, :], Y_t[i, :])`` — per sample, the correlation
      of the student's and the teacher's class distributions (invariant to a positive scaling and a shift
      of either), so only the teacher's *ranking / relative* class probabilities are transferred;
    * **intra-class relation** (Eq. 7): ``1/K sum_j d_p(Y_s[:, j], Y_t[:, j])`` — per class, the correlation
      across the batch of how strongly each sample belongs to that class. It needs a batch of >= 2 samples
      (a single sample's column is constant: its correlation counts as 0, a constant loss of 1).

    Both are multiplied by ``tau^2`` as in the official code (``DIST`` in hunto/image_classification_sota,
    ``inter_loss = tau**2 * inter_class_relation(...)``, same for intra); the paper's Eq. 8
    ``L = alpha L_cls + beta L_inter + gamma L_intra`` is written without it. At the paper's ImageNet
    ``tau = 1`` this is moot; at the CIFAR-100 ``tau = 4`` the published ``beta`` / ``gamma`` only mean what
    they meant with it, so it is applied. The Pearson correlation is computed as in the code (centre, cosine
    with a small ``eps``), which equals the paper's ``Cov / (Std Std)``; the code *adds* ``eps`` to the norm
    product where we clamp it, a difference of order ``1e-8``.

    Published settings: ImageNet ``beta = gamma = 1``, ``tau = 1`` (the code's defaults); CIFAR-100
    ``beta = gamma = 2``, ``tau = 4``. kdray's defaults are the CIFAR-100 ones, as for its other response terms
    (KD, DKD, LSKD: the CIFAR-100 protocol is the library's benchmark). The hard-label CE (the paper's
    ``alpha = 1``) is *not* included: the distiller adds it with weight 1.
    """

    name = "dist"
    kind = "response"
    paper = "Huang et al. 2022, Knowledge Distillation from A Stronger Teacher (NeurIPS)"

    def __init__(self, beta: float = 2.0, gamma: float = 2.0, temperature: float = 4.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"dist.temperature must be > 0, got {temperature}")
        if beta < 0 or gamma < 0:
            raise ValueError(f"dist.beta and dist.gamma must be >= 0, got {beta} and {gamma}")
        self.beta = beta
        self.gamma = gamma
        self.temperature = temperature

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        if teacher.logits.shape != student.logits.shape:
            raise ValueError(f"dist: student logits {tuple(student.logits.shape)} and teacher logits "
                             f"{tuple(teacher.logits.shape)} differ in shape (same batch and classes needed)")
        tau = self.temperature
        inter, intra = prediction_relations(student.logits, teacher.logits, tau)
        return {"dist_inter": self.beta * tau**2 * inter, "dist_intra": self.gamma * tau**2 * intra}
