"""Hinton et al., "Distilling the Knowledge in a Neural Network" (NIPS DL workshop 2015)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method


def kl_div_with_temperature(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                            temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``, averaged over the batch (``batchmean``).

    The ``T^2`` keeps the gradient scale of the soft term independent of ``T`` (Hinton et al., sec. 2).
    """
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


@register_method
class KD(KnowledgeTerm):
    """Hinton KD: ``(1 - alpha) * CE(student, y) + alpha * T^2 * KL(teacher_T || student_T)``.

    ``alpha`` is the weight of the *soft* (teacher) term, as in Hinton's paper and the CRD / mdistiller
    CIFAR protocol (CE 0.1, KD 0.9 -> ``alpha=0.9``). torchdistill's ``alpha`` is the opposite (the CE
    weight): a torchdistill config with ``alpha: 0.1`` is ``alpha: 0.9`` here. KL uses ``batchmean``.
    Published defaults: ``T = 4``, ``alpha = 0.9``.
    """

    name = "kd"
    kind = "response"
    paper = "Hinton et al. 2015, Distilling the Knowledge in a Neural Network"
    provides_ce = True

    def __init__(self, alpha: float = 0.9, temperature: float = 4.0):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"kd.alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"kd.temperature must be > 0, got {temperature}")
        self.alpha = alpha
        self.temperature = temperature

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(student.logits, batch.targets)
        kl = kl_div_with_temperature(student.logits, teacher.logits, self.temperature)
        return {"ce": (1 - self.alpha) * ce, "kd": self.alpha * kl}
