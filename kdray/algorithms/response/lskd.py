"""Sun et al., "Logit Standardization in Knowledge Distillation" (CVPR 2024)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method


def zscore(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """The paper's ``Z(l)``: ``(l - mean(l)) / std(l)`` per sample, std over the classes with ``1/K``.

    The std is clamped below at ``eps`` (constant logits) rather than having ``eps`` added, so the
    result is exactly invariant to ``a * l + b`` for any ``a > 0`` whenever the std exceeds ``eps``.
    """
    centred = logits - logits.mean(dim=1, keepdim=True)
    std = centred.pow(2).mean(dim=1, keepdim=True).sqrt()
    return centred / std.clamp_min(eps)


@register_method
class LSKD(KnowledgeTerm):
    """KD on z-score-standardised logits: ``weight * tau^2 * KL(softmax(Z(t)/tau) || softmax(Z(s)/tau))``.

    The paper argues that teacher and student need not share a logit range, only the logit
    *relations*: each sample's logits are standardised (zero mean, unit std over the classes) before
    the temperature softmax, which amounts to a per-sample temperature ``tau * std(logits)``. The loss
    is therefore invariant to shifting and positively scaling either model's logits. KL is summed over
    the classes and averaged over the batch, times ``tau^2`` (Algorithm 1).

    Where the paper and its code differ we follow the paper: ``std`` is the population std (``1/K``,
    Algorithm 1) where the released code uses ``torch.std`` (``1/(K-1)``) — a constant factor
    ``sqrt(K/(K-1))`` on the effective temperature — and the code adds ``1e-7`` to the std where we
    clamp it (which keeps the invariance exact).

    The hard-label CE is *not* included; the distiller adds it with weight 1, matching the paper's
    CIFAR setting (``CE weight 1, KD weight 9``; the repository's ``--kd-weight 9``).
    Published CIFAR-100 defaults: base temperature ``tau = 2``, ``weight = 9``.
    """

    name = "lskd"
    kind = "response"
    paper = "Sun et al. 2024, Logit Standardization in Knowledge Distillation (CVPR)"

    def __init__(self, weight: float = 9.0, temperature: float = 2.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"lskd.temperature must be > 0, got {temperature}")
        self.weight = weight
        self.temperature = temperature

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        tau = self.temperature
        log_p_s = F.log_softmax(zscore(student.logits) / tau, dim=1)
        log_p_t = F.log_softmax(zscore(teacher.logits) / tau, dim=1)
        kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
        return {"lskd": self.weight * tau**2 * kl}
