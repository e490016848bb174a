"""Heo et al., "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden Neurons" (AAAI 2019)."""
from __future__ import annotations

import torch
import torch.nn as nn

from kdray.algorithms.base import Batch, ModelOutput, register_method
from kdray.algorithms.feature.connectors import PhasedTerm, conv_bn, feature_pairs, not_built, pool_to_common

# The authors' code (and RepDistiller) divide the per-sample sum by 1000 and multiply by 3; kept so
# that ``weight=1`` is RepDistiller's ``-b 1`` and gives the same step sizes.
_AUTHORS_SCALE = 3.0 / 1000.0


def alternative_l2(source: torch.Tensor, target: torch.Tensor, margin: float) -> torch.Tensor:
    """The paper's alternative loss, per element: ``rho(t) * relu(mu - s)^2 + (1 - rho(t)) * relu(mu + s)^2``.

    ``rho(t) = 1[t > 0]`` is the teacher neuron's activation; a student neuron is pushed beyond the
    margin ``mu`` on the teacher's side of the activation boundary.
    """
    active = (target > 0).to(source.dtype)
    return active * torch.relu(margin - source).pow(2) + (1 - active) * torch.relu(margin + source).pow(2)


@register_method
class AB(PhasedTerm):
    """Activation-boundary distillation: the student's neurons must be active exactly where the teacher's are.

    At every stage, a connector ``r`` (1x1 conv + BN, as in the authors' code) maps the student's feature to the
    teacher's channels and the alternative (hinge-squared) loss of :func:`alternative_l2` with margin
    ``mu = 1`` is summed over the elements, averaged over the batch, and weighted ``2^(i - n + 1)``
    per stage (deepest stage 1, the one before 1/2, ...: the authors' code)::

        weight * 3/1000 * sum_i 2^(i-n+1) * 1/B * sum || alternative_l2(r(S_i), T_i) ||_1

    Only the sign of the teacher's feature matters, so post-ReLU teacher points (``T > 0``) give
    the same targets as the pre-ReLU points the paper uses. Spatial mismatch: adaptive average
    pooling of the larger map to the smaller.

    Phases: the paper uses AB as an *initialisation*: for the first ``init_epochs`` epochs only the AB
    loss trains the student and the connectors (:meth:`uses_hard_labels` is ``False``, the distiller
    drops the CE); afterwards the student trains on the CE alone (plus any other term, e.g. ``kd``
    for the paper's AB + KD), and this term contributes nothing (``keep_after_init=False``) -
    RepDistiller does the same. ``keep_after_init=True`` keeps the AB loss next to the CE afterwards
    (with ``init_epochs=0``: a single-stage AB). The init epochs count in the run's epochs;
    parameters left without a gradient in a phase need DDP's ``find_unused_parameters=True``.

    Defaults: ``weight=1`` (RepDistiller CIFAR-100 ``-b 1``), ``margin=1``, ``init_epochs=30``
    (RepDistiller's ``init_epochs``).
    """

    name = "ab"
    kind = "feature"
    paper = ("Heo, Lee, Yun, Choi 2019, Knowledge Transfer via Distillation of Activation Boundaries "
             "Formed by Hidden Neurons")
    default_student_points = "stages"
    default_teacher_points = "stages"

    def __init__(self, weight: float = 1.0, margin: float = 1.0, init_epochs: int = 30,
                 keep_after_init: bool = False):
        super().__init__()
        if weight < 0:
            raise ValueError(f"ab.weight must be >= 0, got {weight}")
        if margin < 0:
            raise ValueError(f"ab.margin must be >= 0, got {margin}")
        if init_epochs < 0:
            raise ValueError(f"ab.init_epochs must be >= 0, got {init_epochs}")
        if init_epochs == 0 and not keep_after_init:
            raise ValueError("ab: init_epochs=0 with keep_after_init=False would never apply the loss")
        self.weight = weight
        self.margin = margin
        self.init_epochs = init_epochs
        self.keep_after_init = keep_after_init
        self.connectors: nn.ModuleList | None = None

    def in_init(self) -> bool:
        return self.epoch < self.init_epochs

    def uses_hard_labels(self) -> bool:
        return not self.in_init()

    def build(self, student: ModelOutput, teacher: ModelOutput, num_samples: int) -> None:
        pairs = feature_pairs(self, student, teacher)
        self.connectors = nn.ModuleList(
            conv_bn(p.student.shape[1], p.teacher.shape[1]).to(device=p.student.device, dtype=p.student.dtype)
            for p in pairs
        )

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        if self.connectors is None:
            raise not_built(self.name)
        if not (self.in_init() or self.keep_after_init):
            return {}
        pairs = feature_pairs(self, student, teacher)
        n = len(pairs)
        total = 0.0
        for pair in pairs:
            s, t = pool_to_common(self.connectors[pair.index](pair.student), pair.teacher)
            per_sample = alternative_l2(s, t, self.margin).sum() / s.shape[0]
            total = total + 2.0 ** (pair.index - n + 1) * per_sample
        return {"ab": self.weight * _AUTHORS_SCALE * total}
