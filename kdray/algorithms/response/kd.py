"""Hinton et al., "Distilling the Knowledge in a Neural Network" (NIPS DL workshop 2015)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method
from kdray.algorithms.distiller import hard_label_ce, token_rows
from kdray.algorithms.precision import full_precision


def kl_div_with_temperature(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                            temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``, averaged over the batch (``batchmean``).

    The ``T^2`` keeps the gradient scale of the soft term independent of ``T`` (Hinton et al., sec. 2).
    Computed in fp32 for bf16 / fp16 logits (the online and BYOT schemes call it outside a term).
    """
    log_p_s = F.log_softmax(full_precision(student_logits) / temperature, dim=1)
    log_p_t = F.log_softmax(full_precision(teacher_logits) / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


@register_method
class KD(KnowledgeTerm):
    """Hinton KD: ``(1 - alpha) * CE(student, y) + alpha * T^2 * KL(teacher_T || student_T)``.

    ``alpha`` is the weight of the *soft* (teacher) term, as in Hinton's paper and the CRD / mdistiller
    CIFAR protocol (CE 0.1, KD 0.9 -> ``alpha=0.9``). torchdistill's ``alpha`` is the opposite (the CE
    weight): a torchdistill config with ``alpha: 0.1`` is ``alpha: 0.9`` here. KL uses ``batchmean``.
    Published defaults: ``T = 4``, ``alpha = 0.9``.

    ``ce_weight`` (optional) drops the convex form: the loss is ``ce_weight * CE + alpha * T^2 * KL`` with
    any ``alpha >= 0``, RepDistiller's ``-r`` / ``-a`` pair. Its CRD+KD row (``-r 1 -a 1 -b 0.8``) is
    ``[{name: kd, alpha: 1, ce_weight: 1}, {name: crd, weight: 0.8}]``.
    """

    name = "kd"
    kind = "response"
    paper = "Hinton et al. 2015, Distilling the Knowledge in a Neural Network"
    provides_ce = True

    def __init__(self, alpha: float = 0.9, temperature: float = 4.0, ce_weight: float | None = None):
        super().__init__()
        if ce_weight is None and not 0.0 <= alpha <= 1.0:
            raise ValueError(f"kd.alpha must be in [0, 1] (or give kd.ce_weight for independent weights), "
                             f"got {alpha}")
        if ce_weight is not None and (ce_weight < 0 or alpha < 0):
            raise ValueError(f"kd.ce_weight and kd.alpha must be >= 0, got {ce_weight} and {alpha}")
        if temperature <= 0:
            raise ValueError(f"kd.temperature must be > 0, got {temperature}")
        self.alpha = alpha
        self.temperature = temperature
        self.ce_weight = 1 - alpha if ce_weight is None else ce_weight

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        ce = hard_label_ce(student.logits, batch.targets)  # per-token labels too (masked LM, -100 ignored)
        kl = kl_div_with_temperature(*token_rows(student.logits, teacher.logits, batch), self.temperature)
        return {"ce": self.ce_weight * ce, "kd": self.alpha * kl}
