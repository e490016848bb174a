"""Yuan et al., "Revisiting Knowledge Distillation via Label Smoothing Regularization" (CVPR 2020)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method


def virtual_teacher_log_probs(targets: torch.Tensor, num_classes: int, correct_prob: float) -> torch.Tensor:
    """``log p^d``: ``a`` on the true class and ``(1 - a) / (K - 1)`` on every other class."""
    other = math.log((1.0 - correct_prob) / (num_classes - 1))
    out = torch.full((targets.shape[0], num_classes), other, device=targets.device)
    return out.scatter_(1, targets.view(-1, 1), math.log(correct_prob))


@register_method
class TfKD(KnowledgeTerm):
    """Teacher-free KD with a manually designed (virtual) teacher, Tf-KD_reg (Yuan et al., sec. 5, Eq. 9).

    ``(1 - alpha) * CE(student, y) + alpha * weight * tau^2 * KL(p^d_tau || p_tau)`` where the virtual
    teacher ``p^d`` puts ``a`` (``correct_prob``) on the true class and ``(1 - a) / (K - 1)`` on each other
    class — a 100%-accurate teacher that is label smoothing in disguise, hence *no teacher is used*:
    the teacher's output is never read, so a placeholder (e.g. the student's own logits) is fine.
    Because the paper's total loss contains the CE, this term provides it (``provides_ce``).

    Following the paper rather than the authors' code: Eq. 9 softens *both* distributions with ``tau``.
    The teacher's logits are ``log p^d`` (a distribution's logits), so ``p^d_tau = softmax(log p^d / tau)``
    and the student side is ``p_tau = softmax(z / tau)``. The code (``loss_kd_regularization``) instead
    compares the *unsoftened* student with ``softmax(p^d / tau)`` — a softmax of probabilities, which is
    almost uniform — i.e. it is plain label smoothing towards near-uniform. With the paper's form the
    optimum is the student matching ``p^d`` itself, for any ``tau``. As in Hinton KD (and the authors'
    own KD loss for Eq. 3, which is also printed without it), the KL is multiplied by ``tau^2`` so its
    gradient does not vanish as ``1/tau``; KL is summed over classes and averaged over the batch
    (the code's ``KLDivLoss()`` mean over ``B*K`` times its ``multiplier = 100`` equals this on CIFAR-100).

    Published defaults (authors' CIFAR-100 ResNet-18 setting): ``alpha = 0.1``, ``tau = 20``,
    ``a = 0.99`` (the paper requires ``a >= 0.9``); ``weight = 1``.
    """

    name = "tfkd"
    kind = "response"
    paper = "Yuan et al. 2020, Revisiting Knowledge Distillation via Label Smoothing Regularization (CVPR)"
    provides_ce = True

    def __init__(self, weight: float = 1.0, alpha: float = 0.1, temperature: float = 20.0,
                 correct_prob: float = 0.99):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"tfkd.alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"tfkd.temperature must be > 0, got {temperature}")
        if not 0.0 < correct_prob < 1.0:
            raise ValueError(f"tfkd.correct_prob must be in (0, 1), got {correct_prob}")
        self.weight = weight
        self.alpha = alpha
        self.temperature = temperature
        self.correct_prob = correct_prob

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        logits = student.logits
        tau = self.temperature
        log_pd = virtual_teacher_log_probs(batch.targets, logits.shape[1], self.correct_prob).to(logits.dtype)
        log_p_teacher = F.log_softmax(log_pd / tau, dim=1)
        log_p_student = F.log_softmax(logits / tau, dim=1)
        kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
        ce = F.cross_entropy(logits, batch.targets)
        return {"ce": (1 - self.alpha) * ce, "tfkd": self.alpha * self.weight * tau**2 * kl}
