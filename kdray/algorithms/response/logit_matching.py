"""Ba & Caruana, "Do Deep Nets Really Need to be Deep?" (NIPS 2014)."""
from __future__ import annotations

import torch

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method


def logit_l2(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``1/B * sum_i 1/2 ||z_s(x_i) - z_t(x_i)||_2^2``: half the squared L2 distance between the
    logit vectors, summed over the classes and averaged over the batch."""
    diff = student_logits - teacher_logits.to(student_logits.dtype)
    return 0.5 * diff.pow(2).sum(dim=1).mean()


@register_method
class LogitMatching(KnowledgeTerm):
    """Mimic learning by regressing the teacher's logits: ``weight * 1/B sum_i 1/2 ||z_s - z_t||^2``.

    The student's pre-softmax logits ``z_s`` are regressed onto the teacher's ``z_t`` with an L2 loss
    (sec. 2.2, "Mimic Learning via Regressing Logit with L2 Loss"): no temperature, no softmax, so the
    log-ratios between classes that the softmax hides are transferred as they are. Hinton et al. show
    KD tends to this loss as ``T -> inf`` for zero-mean logits.

    Normalisation, as in the paper: ``L(W, beta) = 1/(2T) sum_t ||g(x_t; W, beta) - z_t||_2^2`` over
    the ``T`` training cases, i.e. the squared L2 norm *summed over the classes*, halved, and averaged
    over the samples; per mini-batch that is the batch mean. Common re-implementations
    (Knowledge-Distillation-Zoo's ``Logits``, mmrazor/mmcls) use ``F.mse_loss``, the mean over the
    ``B x K`` entries without the 1/2, so their weight ``w`` is ``2 * w / K`` here.

    The paper's mimic models train on this loss alone (the teacher labels unlabelled data); here the
    distiller adds the hard-label CE with ``ce_weight`` (default 1) as for the other terms — set
    ``ce_weight: 0`` for the paper's pure mimic setting. The paper publishes no CIFAR-100
    weight for the RepDistiller-style benchmark; ``weight = 1`` is its objective as written (note that
    the sum over classes makes the term grow with the class count ``K``; tune it).
    """

    name = "logit_matching"
    kind = "response"
    paper = "Ba & Caruana 2014, Do Deep Nets Really Need to be Deep? (NIPS)"

    def __init__(self, weight: float = 1.0):
        super().__init__()
        if weight < 0:
            raise ValueError(f"logit_matching.weight must be >= 0, got {weight}")
        self.weight = weight

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        if teacher.logits.shape != student.logits.shape:
            raise ValueError(f"logit_matching: student logits {tuple(student.logits.shape)} and teacher logits "
                             f"{tuple(teacher.logits.shape)} differ in shape (same classes needed)")
        return {"logit_matching": self.weight * logit_l2(student.logits, teacher.logits)}
