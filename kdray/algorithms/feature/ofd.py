"""Heo et al., "A Comprehensive Overhaul of Feature Distillation" (ICCV 2019)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method
from kdray.algorithms.feature.connectors import conv_bn, feature_pairs, not_built, pool_to_common

_MIN_NEGATIVE_MASS = 1e-3  # below this P(x < 0) the margin falls back to -3 sigma (the authors' code)


def gaussian_margin(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``E[x | x < 0]`` for ``x ~ N(mean, std^2)``, per channel (the paper's margin).

    ``m = mean - std * phi(mean/std) / Phi(-mean/std)``; where the negative mass ``Phi(-mean/std)``
    is below 1e-3 the margin is ``-3 std`` (as the authors' code does).
    """
    std = std.clamp_min(1e-6)
    z = mean / std
    neg_mass = torch.special.ndtr(-z)
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    margin = mean - std * pdf / neg_mass.clamp_min(1e-12)
    return torch.where(neg_mass > _MIN_NEGATIVE_MASS, margin, -3 * std)


def partial_l2(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The paper's partial L2, per element: ``(t - s)^2`` except where ``s <= t <= 0`` (then 0)."""
    skip = (source <= target) & (target <= 0)
    return (source - target).pow(2) * (~skip).to(source.dtype)


@register_method
class OFD(KnowledgeTerm):
    """Overhaul of feature distillation: margin-ReLU teacher, 1x1 conv + BN student connector, partial L2.

    At every stage the teacher's feature goes through the *margin ReLU* ``max(t, m_c)``,
    ``m_c = E[t_c | t_c < 0]`` per channel, and the student's feature through a connector ``r``
    (1x1 conv + BN); the distance is the partial L2 of :func:`partial_l2`, summed over the elements
    (as the paper writes it), averaged over the batch, and weighted ``layer_decay^(n-1-i)`` per stage::

        weight * sum_i layer_decay^(n-1-i) * 1/B * sum d_p(max(T_i, m_i), r(S_i))

    Margins: the paper computes ``m`` from the teacher's BN (``gamma, beta``) under a Gaussian
    assumption; a term only sees features, so here the same closed form is applied to each
    channel's mean and standard deviation of the teacher's feature on the build batch (teacher in
    eval mode), kept as buffers (they go into checkpoints). The paper distils *pre-ReLU* features;
    with post-ReLU points (as the digits / CIFAR ``stages``) the teacher has no negative values,
    the margin no effect, and the loss reduces to an L2 that ignores positions where the student is
    below a zero teacher. Point the term at pre-ReLU modules (e.g. a stage's last BN) for the
    paper's setting.

    Spatial mismatch: the larger map (after the connector) is adaptive-average-pooled to the smaller.
    ``layer_decay=0.5`` is the authors' code's ``1 / 2^(n-1-i)`` (mdistiller too); the paper's loss
    is the plain sum (``layer_decay=1``).

    Default ``weight=1e-3``: mdistiller's CIFAR-100 FEAT_WEIGHT 0.001 with this sum-over-elements,
    mean-over-batch reduction (the authors' CIFAR code divides by 1000 likewise).
    """

    name = "ofd"
    kind = "feature"
    paper = "Heo, Kim, Yun, Park, Kwak, Choi 2019, A Comprehensive Overhaul of Feature Distillation"
    default_student_points = "stages"
    default_teacher_points = "stages"

    def __init__(self, weight: float = 1e-3, layer_decay: float = 0.5):
        super().__init__()
        if weight < 0:
            raise ValueError(f"ofd.weight must be >= 0, got {weight}")
        if not 0 < layer_decay <= 1:
            raise ValueError(f"ofd.layer_decay must be in (0, 1], got {layer_decay}")
        self.weight = weight
        self.layer_decay = layer_decay
        self.connectors: nn.ModuleList | None = None

    def build(self, student: ModelOutput, teacher: ModelOutput, num_samples: int) -> None:
        pairs = feature_pairs(self, student, teacher)
        self.connectors = nn.ModuleList(
            conv_bn(p.student.shape[1], p.teacher.shape[1]).to(device=p.student.device, dtype=p.student.dtype)
            for p in pairs
        )
        for p in pairs:
            t = p.teacher.detach().float()
            mean = t.mean(dim=(0, 2, 3))
            std = t.std(dim=(0, 2, 3), unbiased=False)
            self.register_buffer(f"margin_{p.index}", gaussian_margin(mean, std).to(p.teacher.dtype))

    def margin(self, index: int) -> torch.Tensor:
        return getattr(self, f"margin_{index}")

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        if self.connectors is None:
            raise not_built(self.name)
        pairs = feature_pairs(self, student, teacher)
        n = len(pairs)
        total = 0.0
        for pair in pairs:
            margin = self.margin(pair.index).to(pair.teacher.dtype).view(1, -1, 1, 1)
            target = torch.maximum(pair.teacher, margin)
            s, t = pool_to_common(self.connectors[pair.index](pair.student), target)
            per_sample = partial_l2(s, t).sum() / s.shape[0]
            total = total + self.layer_decay ** (n - 1 - pair.index) * per_sample
        return {"ofd": self.weight * total}
