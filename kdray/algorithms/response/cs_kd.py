"""Yun, Park, Lee, Shin, "Regularizing Class-wise Predictions via Self-knowledge Distillation" (CS-KD, CVPR 2020)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method
from kdray.algorithms.response.kd import kl_div_with_temperature


@register_method
class CSKD(KnowledgeTerm):
    """CS-KD: a network teaches itself that two samples of one class should get the same prediction.

    Each batch is ``[x_1 .. x_B, x'_1 .. x'_B]`` with ``x'_i`` another training sample of ``x_i``'s class (the
    loaders make such batches for this term: :class:`kdray.data.ClassPairBatchSampler`). The loss (paper Eq. 3) is

        ``ce_weight * CE(z(x), y) + lambda * T^2 * KL(softmax(z(x') / T).detach() || softmax(z(x) / T))``

    over the first half, KL averaged over its ``B`` samples: the prediction on the partner is a fixed target
    (no gradient, as the paper's "we do not propagate the gradient through P(y|x'; theta~)").

    Where kdray follows the official code (alinlab/cs-kd ``train.py``): the hard-label CE is on the first half only
    (so this term provides it, ``provides_ce``), and defaults ``T = 4``, ``lambda = 1`` (its CIFAR / TinyImageNet
    runs; fine-grained datasets use ``lambda = 3``). Where it differs: the code forwards the partners in a second
    pass under ``no_grad``; here the distiller forwards the whole ``2 B`` batch once, so BatchNorm's batch statistics
    are taken over both halves (an equal mix of the same classes) and the partners' logits are detached instead.
    There is no teacher: ``needs_teacher`` is ``False``, so a stage with only this term runs without one.
    """

    name = "cs_kd"
    kind = "response"
    paper = "Yun et al. 2020, Regularizing Class-wise Predictions via Self-knowledge Distillation (CVPR)"
    provides_ce = True
    needs_teacher = False
    needs_class_pairs = True

    def __init__(self, lambda_cls: float = 1.0, temperature: float = 4.0, ce_weight: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"cs_kd.temperature must be > 0, got {temperature}")
        if lambda_cls < 0 or ce_weight < 0:
            raise ValueError(f"cs_kd.lambda_cls and cs_kd.ce_weight must be >= 0, got {lambda_cls} and {ce_weight}")
        self.lambda_cls = lambda_cls
        self.temperature = temperature
        self.ce_weight = ce_weight

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        logits, targets = student.logits, batch.targets
        if logits.dim() != 2 or targets.shape != logits.shape[:1]:
            raise ValueError(f"cs_kd: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not match "
                             f"(need (N, classes) logits and N targets)")
        half = logits.shape[0] // 2
        if logits.shape[0] % 2 or not torch.equal(targets[:half], targets[half:]):
            raise ValueError(f"cs_kd: the batch of {logits.shape[0]} is not class pairs (the second half's targets "
                             f"must repeat the first half's); use the class-pair loaders (data.class_pairs: true)")
        anchor, partner = logits[:half], logits[half:].detach()
        ce = F.cross_entropy(anchor, targets[:half])
        kl = kl_div_with_temperature(anchor, partner, self.temperature)
        return {"ce": self.ce_weight * ce, "cs_kd": self.lambda_cls * kl}
