"""Wen et al., "Preparing Lessons: Improve Knowledge Distillation with Better Supervision" (arXiv 1911.07471,
2019): knowledge adjustment by probability shift."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method
from kdray.algorithms.response.kd import kl_div_with_temperature


def shift_to_target(teacher_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The teacher's logits with, on every sample it gets wrong, its top class and the true class swapped.

    Softmax is equivariant to permuting the classes, so swapping the two *logits* swaps the two
    *probabilities* at every temperature; rows the teacher gets right (``argmax == target``) are unchanged."""
    t = teacher_logits.detach()
    predicted = t.argmax(dim=1, keepdim=True)
    target = targets.view(-1, 1)
    at_target, at_predicted = t.gather(1, target), t.gather(1, predicted)
    return t.scatter(1, predicted, at_target).scatter(1, target, at_predicted)


@register_method
class ProbabilityShift(KnowledgeTerm):
    """Hinton KD onto a *corrected* teacher: ``(1 - alpha) CE + alpha T^2 KL(A(p_t^T) || p_s^T)``.

    Knowledge adjustment ``A`` by probability shift (the paper's "PS"): where the teacher's prediction is
    wrong, the probability of its predicted (maximum) class and that of the ground-truth class are swapped,
    so the soft target peaks at the true class while every other value of the teacher's distribution is kept
    (no mass is invented, unlike replacing the target by a smoothed one-hot, the paper's other adjustment,
    KD_Lib's ``LabelSmoothReg``). Samples the teacher gets right are distilled as in plain KD. The swap is
    done on the logits, which is the same swap of the probabilities at any temperature (see
    :func:`shift_to_target`); the adjusted target carries no gradient.

    The loss around ``A`` is kdray's :class:`~kdray.algorithms.response.kd.KD` (KL summed over classes,
    ``batchmean``, ``T^2``), whose defaults it takes: ``alpha = 0.9``, ``T = 4`` (the CIFAR-100 KD protocol; the
    paper adjusts the KD target and leaves the KD loss as it is). This term provides the hard-label CE
    (``provides_ce``), weighted ``1 - alpha``. Departures from KD_Lib's ``ProbShift``: KD_Lib (defaults
    ``T = 20``, weight 0.5) swaps the probabilities in a Python loop, weights the CE as ``T * CE(z_s / T)`` and
    passes the teacher's probabilities as ``KLDivLoss``'s *input* and the student's as its target (the
    reverse of its contract, which expects the student's log-probabilities); here the KL is the usual one.
    """

    name = "probability_shift"
    kind = "response"
    paper = "Wen et al. 2019, Preparing Lessons: Improve Knowledge Distillation with Better Supervision"
    provides_ce = True

    def __init__(self, alpha: float = 0.9, temperature: float = 4.0):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"probability_shift.alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"probability_shift.temperature must be > 0, got {temperature}")
        self.alpha = alpha
        self.temperature = temperature

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        s, t = student.logits, teacher.logits
        if t.shape != s.shape or s.dim() != 2 or batch.targets.shape != s.shape[:1]:
            raise ValueError(f"probability_shift: student logits {tuple(s.shape)}, teacher logits {tuple(t.shape)} "
                             f"and targets {tuple(batch.targets.shape)} do not match (need (B, K), (B, K), (B,))")
        adjusted = shift_to_target(t, batch.targets)
        kl = kl_div_with_temperature(s, adjusted, self.temperature)
        ce = F.cross_entropy(s, batch.targets)
        return {"ce": (1 - self.alpha) * ce, "probability_shift": self.alpha * kl}
