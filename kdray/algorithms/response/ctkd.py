"""Li et al., "Curriculum Temperature for Knowledge Distillation" (CTKD, AAAI 2023)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method
from kdray.algorithms.response.kd import kl_div_with_temperature


class GradientReversal(torch.autograd.Function):
    """Identity forward; the backward multiplies the incoming gradient by ``-scale`` (Ganin & Lempitsky 2015).

    With it the temperature *ascends* the distillation loss the student descends: the min-max game that makes
    the task harder as the student gets better."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.scale * grad, None


def cosine_ramp(step: float, steps: float) -> float:
    """``(1 - cos(pi * min(step, steps) / steps)) / 2``: 0 at ``step <= 0``, 1 from ``step >= steps`` on."""
    step = min(max(step, 0.0), steps)
    return (1.0 - math.cos(math.pi * step / steps)) / 2.0


@register_method
class CTKD(KnowledgeTerm):
    """CTKD: KD at a *learned* temperature that is trained adversarially, harder and harder.

    One learnable scalar ``theta`` (the paper's *global* temperature; the instance-wise variant, an MLP
    predicting one temperature per sample, is not implemented) gives ``tau = min_temperature +
    temperature_span * sigmoid(theta)``: the official code's bound (``t_start + t_end * sigmoid(T)``, ``--t_start
    1 --t_end 20``), so ``tau`` stays in ``(1, 21)``; ``theta`` starts at 1 (``nn.Parameter(torch.ones(1))``,
    ``tau ~ 15.6``). The loss is Hinton's KD at that temperature,
    ``(1 - alpha) CE + alpha tau^2 KL(softmax(z_t / tau) || softmax(z_s / tau))``, the code's ``-r 0.1 -a 0.9``
    (``DistillKL`` multiplies by ``T * T`` with the learned ``T``).

    ``theta`` reaches the loss through a gradient reversal layer of strength ``lambda``: the student
    minimises the KD loss, ``theta`` maximises it (Eq. 5-6 of the paper). ``lambda`` follows the paper's
    cosine curriculum from 0 to ``lambda_max`` over ``lambda_epochs``, then stays there. The official code
    computes it once per epoch with its epochs counted from 1 (``CosineDecay(0, -1, 10).get_value(epoch)``,
    handed to a layer that multiplies the gradient by the negative value); kdray's epochs count from 0, so epoch
    ``e`` (``set_epoch``) gets the code's value for ``e + 1``: ``lambda = lambda_max (1 - cos(pi min(e + 1,
    lambda_epochs) / lambda_epochs)) / 2`` (``0.0245 lambda_max`` in the first epoch, ``lambda_max`` from epoch
    ``lambda_epochs - 1`` on). The paper's CIFAR-100 settings: ``lambda_epochs = 10``, ``lambda_max = 1``.

    ``theta`` is a parameter of this term, so it is in the optimiser with the student (as in the code, which
    puts ``Global_T`` in the SGD parameter list, weight decay included). ``temperature`` (a property) is the
    current value, for logging.
    """

    name = "ctkd"
    kind = "response"
    paper = "Li et al. 2023, Curriculum Temperature for Knowledge Distillation (AAAI)"
    provides_ce = True

    def __init__(self, alpha: float = 0.9, min_temperature: float = 1.0, temperature_span: float = 20.0,
                 initial_theta: float = 1.0, lambda_max: float = 1.0, lambda_epochs: int = 10):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"ctkd.alpha must be in [0, 1], got {alpha}")
        if min_temperature <= 0 or temperature_span <= 0:
            raise ValueError(f"ctkd.min_temperature and ctkd.temperature_span must be > 0, got {min_temperature} "
                             f"and {temperature_span}")
        if lambda_max < 0 or lambda_epochs < 1:
            raise ValueError(f"ctkd.lambda_max must be >= 0 and ctkd.lambda_epochs >= 1, got {lambda_max} and "
                             f"{lambda_epochs}")
        self.alpha = alpha
        self.min_temperature = min_temperature
        self.temperature_span = temperature_span
        self.lambda_max = lambda_max
        self.lambda_epochs = lambda_epochs
        self.theta = nn.Parameter(torch.full((1,), float(initial_theta)))
        self.set_epoch(0)

    def build(self, student: ModelOutput, teacher: ModelOutput, num_samples: int) -> None:
        """Put ``theta`` on the logits' device and dtype (a float64 student gets a float64 temperature)."""
        self.theta.data = self.theta.data.to(device=student.logits.device, dtype=student.logits.dtype)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.reversal = self.lambda_max * cosine_ramp(self.epoch + 1, self.lambda_epochs)

    def current_temperature(self) -> torch.Tensor:
        """``min_temperature + temperature_span * sigmoid(theta)`` with the reversed gradient path."""
        theta = GradientReversal.apply(self.theta, self.reversal)
        return self.min_temperature + self.temperature_span * torch.sigmoid(theta)

    @property
    def temperature(self) -> float:
        return float(self.min_temperature + self.temperature_span * torch.sigmoid(self.theta.detach()))

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        if teacher.logits.shape != student.logits.shape:
            raise ValueError(f"ctkd: student logits {tuple(student.logits.shape)} and teacher logits "
                             f"{tuple(teacher.logits.shape)} differ in shape (same batch and classes needed)")
        tau = self.current_temperature().reshape(()).to(student.logits.dtype)
        ce = F.cross_entropy(student.logits, batch.targets)
        kl = kl_div_with_temperature(student.logits, teacher.logits, tau)
        return {"ce": (1 - self.alpha) * ce, "ctkd": self.alpha * kl}
