"""Zhou et al., "Rethinking Soft Labels for Knowledge Distillation: A Bias-Variance Tradeoff Perspective"
(ICLR 2021)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method


def wsl_weights(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                eps: float = 1e-7) -> torch.Tensor:
    """The per-sample weights ``w_i = 1 - exp(-CE_s(x_i) / CE_t(x_i))``, detached (``B``).

    ``CE_s`` / ``CE_t`` are the student's and the teacher's hard-label cross-entropies at temperature 1; the
    teacher's is clamped below at ``eps`` (a teacher certain of the right class gives ``w -> 1``)."""
    with torch.no_grad():
        ce_s = F.cross_entropy(student_logits, targets, reduction="none")
        ce_t = F.cross_entropy(teacher_logits, targets, reduction="none")
        return 1 - torch.exp(-ce_s / ce_t.clamp_min(eps))


@register_method
class WSLD(KnowledgeTerm):
    """Weighted soft labels: ``alpha * T^2 * 1/B sum_i w_i * H(p_t^T(x_i), p_s^T(x_i))``.

    ``H(p, q) = -sum_k p_k log q_k`` is the soft-label cross-entropy at temperature ``T``, and the paper's
    sample weight is ``w_i = 1 - exp(-L_ce^s / L_ce^t)``, from the ratio of the student's and the teacher's
    hard-label cross-entropies (computed at ``T = 1``, as in the authors' code). Where the student already does
    better than the teacher (``L_ce^s << L_ce^t``, the paper's "regularization samples", whose soft labels
    raise the bias) the weight is small; where the student lags, ``w -> 1``. The weights are **detached**
    (the code computes them from ``.detach()``-ed logits): they rescale each sample's soft-label gradient and
    are not themselves optimised.

    Following the paper (and the code) the soft term is the cross-entropy, not the KL: the two differ by the
    weighted teacher entropy ``1/B sum_i w_i H(p_t^T(x_i))``, which has no gradient for the student, so the
    gradients are identical and only the logged value differs (it does not reach 0 when the student matches).
    The ``T^2`` factor is the code's (``soft_loss = T**2 * mean(...)``); the paper's total loss is
    ``L = L_ce + alpha * L_wsl``: the hard-label CE is *not* included here, the distiller adds it with weight 1.
    The code adds ``1e-7`` to ``L_ce^t`` where we clamp it, a difference of order ``1e-7``.

    Published settings: ``alpha = 2.25`` on CIFAR-100 and ``2.5`` on ImageNet; ``T = 2`` (the authors'
    released code). kdray's defaults: ``alpha = 2.25``, ``T = 2``.
    """

    name = "wsld"
    kind = "response"
    paper = ("Zhou et al. 2021, Rethinking Soft Labels for Knowledge Distillation: A Bias-Variance Tradeoff "
             "Perspective (ICLR)")

    def __init__(self, alpha: float = 2.25, temperature: float = 2.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"wsld.temperature must be > 0, got {temperature}")
        if alpha < 0:
            raise ValueError(f"wsld.alpha must be >= 0, got {alpha}")
        self.alpha = alpha
        self.temperature = temperature

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        s, t = student.logits, teacher.logits
        if t.shape != s.shape:
            raise ValueError(f"wsld: student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} differ in "
                             f"shape (same batch and classes needed)")
        tau = self.temperature
        weights = wsl_weights(s, t, batch.targets)
        p_t = F.softmax(t / tau, dim=1)
        soft_ce = -(p_t * F.log_softmax(s / tau, dim=1)).sum(dim=1)
        return {"wsld": self.alpha * tau**2 * (weights * soft_ce).mean()}
