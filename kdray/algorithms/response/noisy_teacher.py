"""Sau & Balasubramanian, "Deep Model Compression: Distilling Knowledge from Noisy Teachers" (arXiv 2016)."""
from __future__ import annotations

import torch

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method
from kdray.algorithms.response.logit_matching import logit_l2


@register_method
class NoisyTeacher(KnowledgeTerm):
    """Logit regression onto a *noisy* teacher: ``weight * 1/B sum_i 1/2 ||z_s(x_i) - z'_t(x_i)||^2``.

    The teacher's logits are perturbed multiplicatively, ``z'_t = (1 + xi) * z_t`` with ``xi ~ N(0, sigma^2)``
    drawn independently for every logit of the selected samples — noise *relative* to each logit, so a
    confident teacher's large logits move more — and only a fraction ``alpha`` of each batch is perturbed
    (``round(alpha * B)`` samples, picked uniformly without replacement; the rest keep the clean ``z_t``).
    The paper's argument: a teacher whose outputs vary from step to step acts like several teachers and
    regularises the student (it shows the perturbation equals a noise-based regulariser on the loss). The
    student then regresses the (noisy) logits with the Ba & Caruana L2 loss the paper builds on, normalised
    as :class:`~kdray.algorithms.response.logit_matching.LogitMatching` (squared L2 summed over the classes,
    halved, batch mean). With ``sigma = 0`` or ``alpha = 0`` this is ``logit_matching``.

    Noise comes from this term's own ``torch.Generator`` seeded with ``seed`` (drawn on the CPU, then moved to
    the logits' device), so a run is reproducible whatever the global RNG does and the same on any device;
    every call advances it. Every data-parallel rank holds the same seed and so draws the same noise pattern
    (on different samples), which is harmless.

    Departures from KD_Lib's ``NoisyTeacher`` (the only public implementation): KD_Lib perturbs the *whole*
    batch with probability ``alpha`` (a coin per batch, from Python's global ``random``) where the paper
    perturbs a fraction ``alpha`` of the samples, names the noise a *variance* (``x * (1 + sqrt(v) * randn)``,
    default ``v = 0.1``, i.e. ``sigma ~= 0.32``) and then matches softmaxes with an MSE at ``T = 20`` instead
    of regressing logits. The paper tunes ``sigma`` and ``alpha`` per dataset; kdray's defaults are
    ``sigma = 0.1`` (small relative noise), ``alpha = 0.5`` (KD_Lib's), ``weight = 1``. The distiller adds the
    hard-label CE with weight 1 (``ce_weight: 0`` for the paper's pure mimic setting).
    """

    name = "noisy_teacher"
    kind = "response"
    paper = "Sau & Balasubramanian 2016, Deep Model Compression: Distilling Knowledge from Noisy Teachers (arXiv)"

    def __init__(self, weight: float = 1.0, sigma: float = 0.1, alpha: float = 0.5, seed: int = 0):
        super().__init__()
        if weight < 0:
            raise ValueError(f"noisy_teacher.weight must be >= 0, got {weight}")
        if sigma < 0:
            raise ValueError(f"noisy_teacher.sigma must be >= 0, got {sigma}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"noisy_teacher.alpha must be in [0, 1], got {alpha}")
        self.weight = weight
        self.sigma = sigma
        self.alpha = alpha
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def perturb(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        """``teacher_logits`` with ``round(alpha * B)`` random rows multiplied elementwise by ``1 + xi``."""
        batch, classes = teacher_logits.shape
        chosen = torch.randperm(batch, generator=self.generator)[: round(self.alpha * batch)]
        xi = torch.randn(len(chosen), classes, generator=self.generator, dtype=torch.float64) * self.sigma
        factor = torch.ones(batch, classes, dtype=torch.float64)
        factor[chosen] += xi
        return teacher_logits.detach() * factor.to(device=teacher_logits.device, dtype=teacher_logits.dtype)

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        if teacher.logits.shape != student.logits.shape or student.logits.dim() != 2:
            raise ValueError(f"noisy_teacher: student logits {tuple(student.logits.shape)} and teacher logits "
                             f"{tuple(teacher.logits.shape)} differ in shape (same (B, K) needed)")
        return {"noisy_teacher": self.weight * logit_l2(student.logits, self.perturb(teacher.logits))}
