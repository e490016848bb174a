"""Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method


@register_method
class DKD(KnowledgeTerm):
    """Decoupled KD: ``alpha * TCKD + beta * NCKD``, ramped in linearly over ``warmup`` epochs.

    With ``p = softmax(z / T)`` and ``t`` the target class, the paper splits Hinton's KL into

    * **TCKD** (target-class KD): ``KL(b_teacher || b_student)`` over the binary distribution
      ``b = [p_t, 1 - p_t]`` (target vs. all the other classes), and
    * **NCKD** (non-target-class KD): ``KL(p^_teacher || p^_student)`` over the distribution of the
      non-target classes alone, ``p^_i = p_i / (1 - p_t)`` for ``i != t``;

    and weights them independently (``KD = TCKD + (1 - p_t^teacher) NCKD`` couples them). Both KLs are
    summed over their classes and averaged over the batch, and multiplied by ``T^2``: the paper's
    equations are written without a temperature, but its experiments use ``T = 4`` with mdistiller,
    which applies Hinton's ``T^2`` gradient-scale factor; the published ``alpha``/``beta`` only mean what
    they meant in the paper with it. Unlike mdistiller, which masks the target class with
    ``-1000 * mask`` and takes ``log`` of the summed binary probabilities, both terms are computed from
    log-sum-exps and by dropping the target column, so they stay finite for any logits.

    Warm-up (mdistiller's ``min(epoch / warmup, 1)`` with 1-based epochs): during the 0-based epoch
    ``e`` both terms are scaled by ``min((e + 1) / warmup, 1)``; ``warmup=0`` disables the ramp.
    The hard-label CE is *not* included: the distiller adds it with weight 1, as mdistiller does
    (``CE_WEIGHT = 1``).

    Published CIFAR-100 defaults (paper / mdistiller): ``alpha = 1``, ``beta = 8``, ``T = 4``,
    ``warmup = 20`` epochs; ``weight`` scales both terms (default 1).
    """

    name = "dkd"
    kind = "response"
    paper = "Zhao et al. 2022, Decoupled Knowledge Distillation (CVPR)"

    def __init__(self, weight: float = 1.0, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 warmup: int = 20):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"dkd.temperature must be > 0, got {temperature}")
        if warmup < 0:
            raise ValueError(f"dkd.warmup must be >= 0 epochs, got {warmup}")
        self.weight = weight
        self.alpha = alpha
        self.beta = beta
        self.temperature = temperature
        self.warmup = warmup
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def ramp(self) -> float:
        """The warm-up factor of the current epoch: ``min((epoch + 1) / warmup, 1)``."""
        if self.warmup == 0:
            return 1.0
        return min((self.epoch + 1) / self.warmup, 1.0)

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        tckd, nckd = decoupled_kl(student.logits, teacher.logits, batch.targets, self.temperature)
        scale = self.weight * self.ramp() * self.temperature**2
        return {"dkd_tckd": scale * self.alpha * tckd, "dkd_nckd": scale * self.beta * nckd}


def decoupled_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD) at ``temperature``, each averaged over the batch, without the ``T^2`` factor."""
    batch, classes = student_logits.shape
    target_mask = F.one_hot(targets, classes).bool()

    def split(logits):
        z = logits / temperature
        log_z = torch.logsumexp(z, dim=1)
        others = z[~target_mask].view(batch, classes - 1)  # non-target logits, order preserved
        log_b = torch.stack([z[target_mask] - log_z, torch.logsumexp(others, dim=1) - log_z], dim=1)
        return log_b, F.log_softmax(others, dim=1)

    log_b_s, log_q_s = split(student_logits)
    log_b_t, log_q_t = split(teacher_logits)
    tckd = F.kl_div(log_b_s, log_b_t, reduction="batchmean", log_target=True)
    nckd = F.kl_div(log_q_s, log_q_t, reduction="batchmean", log_target=True)
    return tckd, nckd
