"""DeepInversion (Yin et al., CVPR 2020): images synthesised from noise by optimising the pixels themselves until
the fixed teacher's BatchNorm layers see the statistics they saw in training and the teacher assigns each image
its wanted class. No generator: each batch of images is its own set of parameters.

The objective of one batch ``x`` with wanted labels ``y`` (the paper's eq. 3-8, the released code's names):

    CE(T(x), y)                                  class prior
  + bn_weight  * sum_l ||mu_l(x) - mu_l||_2 + ||var_l(x) - var_l||_2      feature prior (BatchNormStatistics)
  + tv_weight  * TV_l2(x)  +  l2_weight * ||x||_2                          image priors
  + competition_weight * (1 - JS(T(x), S(x)))                              Adaptive DeepInversion (optional)

Adaptive DeepInversion's competition term rewards images on which a student (the one being distilled) disagrees
with the teacher: ``JS`` is the Jensen-Shannon divergence of their softmax outputs at temperature 3 (the released
code's ``T = 3``), so minimising ``1 - JS`` drives the images to where the student is still wrong.

Paper defaults (ImageNet, ResNet-50): Adam lr 0.25 (betas 0.5, 0.9), 2k iterations, bn weight 0.01 (scaled by
the first layer 10x in the released code), TV-L2 1e-4, L2 1e-5 (values for 224 px images), competition 10 for
CIFAR. kdray departs: no multi-resolution schedule, no random jitter / flip of the batch between iterations
(the digits images are 8 px), one bn weight for every layer; the defaults below are for small images and are
stated, not tuned to a paper's table.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.algorithms.datafree.losses import BatchNormStatistics, total_variation_l2


@dataclass(frozen=True)
class InversionSettings:
    steps: int = 200
    lr: float = 0.1
    bn_weight: float = 1.0
    tv_weight: float = 1e-3
    l2_weight: float = 1e-5
    competition_weight: float = 0.0  # Adaptive DeepInversion: > 0 needs a student
    competition_temperature: float = 3.0


def jensen_shannon(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over the batch of the Jensen-Shannon divergence (natural log) of the two softmax distributions."""
    p = F.softmax(teacher_logits.float() / temperature, dim=1)
    q = F.softmax(student_logits.float() / temperature, dim=1)
    m = (0.5 * (p + q)).clamp_min(1e-12)
    kl = lambda a: (a * (a.clamp_min(1e-12).log() - m.log())).sum(dim=1)  # noqa: E731
    return (0.5 * kl(p) + 0.5 * kl(q)).mean()


def inversion_loss(teacher: nn.Module, statistics: BatchNormStatistics, images: torch.Tensor, labels: torch.Tensor,
                   settings: InversionSettings, student: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The named parts of the objective for one forward of ``images`` (``total`` is what is minimised)."""
    logits = teacher(images)
    parts = {"class_prior": F.cross_entropy(logits.float(), labels), "bn": statistics.loss(),
             "tv": total_variation_l2(images), "l2": torch.norm(images.float())}
    total = (parts["class_prior"] + settings.bn_weight * parts["bn"] + settings.tv_weight * parts["tv"]
             + settings.l2_weight * parts["l2"])
    if settings.competition_weight > 0:
        if student is None:
            raise ValueError("Adaptive DeepInversion (competition_weight > 0) needs the student it competes with")
        parts["competition"] = 1.0 - jensen_shannon(logits, student(images), settings.competition_temperature)
        total = total + settings.competition_weight * parts["competition"]
    parts["total"] = total
    return parts


def synthesize(teacher: nn.Module, labels: torch.Tensor, input_shape: tuple[int, ...], settings: InversionSettings,
               generator: torch.Generator | None = None, student: nn.Module | None = None) -> torch.Tensor:
    """Images for ``labels`` (one per label) of shape ``input_shape`` (C, H, W), optimised from N(0, 1) noise
    drawn with ``generator``. The teacher (and student) are put in ``eval()`` (BatchNorm must use its running
    statistics) and restored after; their weights are never changed. Returns the images, detached."""
    if len(input_shape) != 3:
        raise ValueError(f"DeepInversion synthesises images: input_shape must be (channels, height, width), "
                         f"got {tuple(input_shape)}")
    device = next(teacher.parameters()).device
    modes = [(m, m.training) for m in (teacher, student) if m is not None]
    for module, _ in modes:
        module.eval()
    statistics = BatchNormStatistics(teacher)
    frozen = [p for m, _ in modes for p in m.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        images = torch.randn((len(labels), *input_shape), generator=generator).to(device).requires_grad_(True)
        labels = labels.to(device)
        optimizer = torch.optim.Adam([images], lr=settings.lr, betas=(0.5, 0.9))
        for _ in range(settings.steps):
            optimizer.zero_grad(set_to_none=True)
            loss = inversion_loss(teacher, statistics, images, labels, settings, student)["total"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"DeepInversion loss became {float(loss)}; lower deep_inversion.lr")
            loss.backward()
            optimizer.step()
    finally:
        statistics.remove()
        for p in frozen:
            p.requires_grad_(True)
        for module, mode in modes:
            module.train(mode)
    return images.detach()
