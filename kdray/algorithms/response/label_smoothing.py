"""Szegedy et al., "Rethinking the Inception Architecture for Computer Vision" (CVPR 2016), label smoothing."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method


@register_method
class LabelSmoothing(KnowledgeTerm):
    """Label-smoothing regularisation (LSR, sec. 7): cross-entropy to ``q' = (1 - eps) * onehot(y) + eps / K``.

    ``H(q', p) = (1 - eps) * CE(p, y) + eps * H(u, p)`` with ``u = 1/K`` the uniform distribution over the
    ``K`` classes and ``p = softmax(z)`` (no temperature); returned as ``{"ce": (1 - eps) * CE,
    "label_smoothing": eps * H(u, p)}``, averaged over the batch, so the term replaces the hard-label CE
    (``provides_ce``) and the two parts are logged separately. Their sum equals
    ``F.cross_entropy(z, y, label_smoothing=eps)``. Teacher-free: the teacher's output is never read, so a
    placeholder (the student's own logits) is fine. Paper default ``eps = 0.1`` (ImageNet, ``K = 1000``).

    How it differs from :class:`~kdray.algorithms.response.tfkd.TfKD` (Yuan et al. 2020's "virtual teacher",
    their label-smoothing regulariser in KD form; KD_Lib's ``LabelSmoothReg`` is neither, it is Wen et al.'s
    knowledge adjustment, the teacher's soft labels replaced by a smoothed one-hot where the teacher is
    wrong): ``tfkd`` puts ``a`` on the target
    and ``(1 - a) / (K - 1)`` on each other class (the target excluded from the spread), softens both sides with
    a temperature (20), uses a KL times ``tau^2`` and mixes it with the CE by ``alpha``. Here the smoothing mass
    is spread over *all* ``K`` classes (the target gets ``1 - eps + eps / K``), at temperature 1, as a plain
    cross-entropy, with no further weights. The two meet at one point: ``tfkd`` with ``temperature = 1``,
    ``alpha = 1`` and ``correct_prob = 1 - eps + eps / K`` is this loss minus the constant entropy ``H(q')``
    (same gradient), which the tests check.
    """

    name = "label_smoothing"
    kind = "response"
    paper = "Szegedy et al. 2016, Rethinking the Inception Architecture for Computer Vision (CVPR)"
    provides_ce = True

    def __init__(self, epsilon: float = 0.1):
        super().__init__()
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"label_smoothing.epsilon must be in [0, 1), got {epsilon}")
        self.epsilon = epsilon

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        logits, targets = student.logits, batch.targets
        if logits.dim() != 2 or targets.shape != logits.shape[:1]:
            raise ValueError(f"label_smoothing: student logits {tuple(logits.shape)} and targets "
                             f"{tuple(targets.shape)} do not match (need logits (B, K) and targets (B,))")
        log_p = F.log_softmax(logits, dim=1)
        ce = F.nll_loss(log_p, targets)
        uniform_ce = -log_p.mean(dim=1).mean()
        return {"ce": (1 - self.epsilon) * ce, "label_smoothing": self.epsilon * uniform_ce}
