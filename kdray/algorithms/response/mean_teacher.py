"""Tarvainen & Valpola, "Mean teachers are better role models: Weight-averaged consistency targets improve
semi-supervised deep learning results" (NeurIPS 2017)."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with no gradients and none of its forward hooks (the student's feature taps must
    not fire, nor capture, on the copy)."""
    twin = copy.deepcopy(model)
    for module in twin.modules():
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


def sigmoid_rampup(epoch: int, rampup_epochs: int) -> float:
    """The paper's ramp-up ``exp(-5 (1 - t)^2)``, ``t = epoch / rampup_epochs`` clipped to 1 (1 with no ramp-up)."""
    if rampup_epochs <= 0:
        return 1.0
    t = min(max(epoch, 0), rampup_epochs) / rampup_epochs
    return math.exp(-5.0 * (1.0 - t) ** 2)


@register_method
class MeanTeacher(KnowledgeTerm):
    """Mean teacher: the student is pulled towards the predictions of an exponential moving average of itself.

    ``L = w(epoch) * mean_{i,k} (softmax(z_s)_ik - softmax(z_ema)_ik)^2`` with ``z_ema`` the logits of the EMA
    copy on the same inputs plus its own Gaussian noise (``noise_std``), computed without gradient. After every
    optimizer step the copy moves towards the student, ``theta' <- a theta' + (1 - a) theta`` with
    ``a = min(1 - 1 / (t + 1), decay)`` at update ``t = 1, 2, ...`` (the official code's true average at the
    start). The copy lives in the term (``ema``, plus the update count ``steps``), so a checkpoint holds it and a
    resumed stage continues the same average; its BatchNorm statistics come from its own forward passes in train
    mode, as in the official code (only parameters are averaged).

    **When the EMA update runs**: in :meth:`after_step`, which the loop calls after the optimizer step, not in
    ``forward`` under ``no_grad``: the average must be of the *updated* weights (an update in ``forward`` would
    trail by one step and would also fire on any extra forward, e.g. a gradient check), and the copy must be
    current when a checkpoint is written at the epoch's end.

    Where kdray follows the paper: softmax MSE consistency (mean over classes and batch, the official PyTorch
    ``softmax_mse_loss / minibatch``), decay ``0.99`` during the ramp-up and ``0.999`` after (the paper's
    ConvNet runs), Gaussian input noise ``0.15`` on the teacher's input, the sigmoid ramp-up
    ``exp(-5 (1 - t)^2)`` of the consistency weight, whose maximum ``consistency = 100`` with a 5-epoch ramp-up
    is the official PyTorch CIFAR-10 setting. Where it differs: kdray trains fully supervised (every sample has
    its label: the CE is the distiller's), the ramp-up advances per epoch rather than per step, and the student
    sees the batch as the loader made it (no second augmentation of its own): the two views differ by the
    teacher's noise only. No teacher: ``needs_teacher`` is ``False``.
    """

    name = "mean_teacher"
    kind = "response"
    paper = "Tarvainen & Valpola 2017, Mean teachers are better role models (NeurIPS)"
    needs_teacher = False

    def __init__(self, consistency: float = 100.0, ema_decay: float = 0.999, rampup_decay: float = 0.99,
                 rampup_epochs: int = 5, noise_std: float = 0.15):
        super().__init__()
        if consistency < 0:
            raise ValueError(f"mean_teacher.consistency must be >= 0, got {consistency}")
        for key, value in (("ema_decay", ema_decay), ("rampup_decay", rampup_decay)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"mean_teacher.{key} must be in [0, 1), got {value}")
        if rampup_epochs < 0 or noise_std < 0:
            raise ValueError(f"mean_teacher.rampup_epochs and noise_std must be >= 0, got {rampup_epochs} and "
                             f"{noise_std}")
        self.consistency = consistency
        self.ema_decay = ema_decay
        self.rampup_decay = rampup_decay
        self.rampup_epochs = rampup_epochs
        self.noise_std = noise_std
        self.epoch = 0
        self.ema: nn.Module | None = None
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self._student: tuple[nn.Module, ...] = ()  # a tuple: the student must not become a submodule of the term

    def bind_student_model(self, model: nn.Module) -> None:
        """Start the EMA copy from the student (called by ``Distiller.build``, before the optimizer exists)."""
        self._student = (model,)
        if self.ema is None:
            self.ema = frozen_copy(model).train(self.training)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def weight(self) -> float:
        return self.consistency * sigmoid_rampup(self.epoch, self.rampup_epochs)

    def decay(self) -> float:
        """This update's ``a``: the true average while ``1 - 1/(t+1)`` is below the phase's decay."""
        phase = self.rampup_decay if self.epoch < self.rampup_epochs else self.ema_decay
        return min(1.0 - 1.0 / (int(self.steps) + 1), phase)

    @torch.no_grad()
    def after_step(self) -> None:
        if self.ema is None or not self._student:
            return
        self.steps += 1
        a = self.decay()
        for avg, param in zip(self.ema.parameters(), self._student[0].parameters()):
            avg.mul_(a).add_(param.detach().to(avg.dtype), alpha=1.0 - a)

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        if self.ema is None:
            raise ValueError("mean_teacher: no EMA copy yet; the distiller binds the student in build()")
        x = batch.inputs
        if self.noise_std and isinstance(x, torch.Tensor) and x.is_floating_point():
            x = x + self.noise_std * torch.randn_like(x)
        with torch.no_grad():
            ema_logits = self.ema(x).to(student.logits.dtype)
        if ema_logits.shape != student.logits.shape:
            raise ValueError(f"mean_teacher: student logits {tuple(student.logits.shape)} and EMA logits "
                             f"{tuple(ema_logits.shape)} differ in shape (the EMA copy is of another model)")
        mse = (F.softmax(student.logits, dim=1) - F.softmax(ema_logits, dim=1)).pow(2).mean()
        return {"mean_teacher": self.weight() * mse}
