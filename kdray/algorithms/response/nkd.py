"""Yang et al., "From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach with Normalized
Loss and Customized Soft Labels" (NKD, ICCV 2023)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method


@register_method
class NKD(KnowledgeTerm):
    """NKD: KD split into the target class and a *normalised* distribution over the non-target classes.

    With ``t`` the label, ``T_t`` / ``S_t`` the teacher's / student's probability of it at temperature 1, and
    ``T_hat`` / ``S_hat`` the softmax over the ``K - 1`` non-target logits only at temperature ``tau`` (the
    paper's normalised non-target distributions: the target logit is dropped, so they sum to 1 whatever
    ``T_t`` is)::

        L_NKD = -T_t log S_t  -  gamma tau^2 sum_{i != t} T_hat_i log S_hat_i        (batch means)

    The first term is a CE towards the teacher's confidence in the label (``T_t`` is a constant, no gradient:
    ``.detach()`` in the authors' code), the second a soft CE between the normalised non-target
    distributions. This is the authors' ``NKDLoss`` (yzd-v/cls_KD, ``mmcls/models/dis_losses/nkd.py``) term by
    term; the hard-label CE is not included (the distiller adds it with weight 1, as the authors' distiller
    does). mmrazor (``mmrazor/models/losses``) has no NKD loss, so there is no second implementation to
    follow.

    Defaults: the authors' CIFAR-100 config (``res34_distill_res18_cifar.py``: ``temp=3.0, gamma=3.5``), as
    kdray's other response terms use the CIFAR-100 protocol; their ImageNet setting is ``temperature=1``,
    ``gamma=1.5`` (the class defaults of their code). ``weight`` scales the whole term (1 in the paper).
    """

    name = "nkd"
    kind = "response"
    paper = ("Yang et al. 2023, From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach "
             "with Normalized Loss and Customized Soft Labels (ICCV)")

    def __init__(self, weight: float = 1.0, gamma: float = 3.5, temperature: float = 3.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"nkd.temperature must be > 0, got {temperature}")
        if weight < 0 or gamma < 0:
            raise ValueError(f"nkd.weight and nkd.gamma must be >= 0, got {weight} and {gamma}")
        self.weight = weight
        self.gamma = gamma
        self.temperature = temperature

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        z_s, z_t = student.logits, teacher.logits
        if z_t.shape != z_s.shape or z_s.dim() != 2 or z_s.shape[1] < 2:
            raise ValueError(f"nkd: student logits {tuple(z_s.shape)} and teacher logits {tuple(z_t.shape)} must "
                             f"be the same (batch, classes) shape with >= 2 classes")
        targets = batch.targets
        if targets.shape != (z_s.shape[0],):
            raise ValueError(f"nkd: targets of shape {tuple(targets.shape)} do not match logits "
                             f"{tuple(z_s.shape)}; class indices, one per sample, are needed")
        label = targets.long()[:, None]
        log_s_t = F.log_softmax(z_s, dim=1).gather(1, label)
        t_t = F.softmax(z_t, dim=1).gather(1, label).detach()
        target_term = -(t_t * log_s_t).mean()
        keep = torch.ones_like(z_s, dtype=torch.bool).scatter_(1, label, False)
        n, k = z_s.shape
        tau = self.temperature
        log_s_hat = F.log_softmax(z_s[keep].reshape(n, k - 1) / tau, dim=1)
        t_hat = F.softmax(z_t[keep].reshape(n, k - 1) / tau, dim=1)
        non_target = -self.gamma * tau**2 * (t_hat * log_s_hat).sum(dim=1).mean()
        return {"nkd_target": self.weight * target_term, "nkd_non_target": self.weight * non_target}
