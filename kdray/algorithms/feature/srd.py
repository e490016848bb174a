"""Miles & Mikolajczyk, "Understanding the Role of the Projector in Knowledge Distillation" (AAAI 2024), as
torchdistill implements it (``SRDLoss`` + ``SRDModelWrapper``)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method
from kdray.algorithms.feature.connectors import not_built, shape_error
from kdray.algorithms.feature.point_choice import pick_pair

BN_EPS = 1e-4
LOG_FLOOR = 1e-12


def pooled(x: torch.Tensor) -> torch.Tensor:
    """A ``(B, C, H, W)`` map averaged over positions, as ``(B, C)`` (torchdistill's ``z.mean(-1).mean(-1)``)."""
    return x.mean(dim=(2, 3))


def batch_standardise(z: torch.Tensor, eps: float = BN_EPS) -> torch.Tensor:
    """``BatchNorm1d(affine=False, eps)`` in training mode: each feature to zero mean, unit *biased* variance
    over the batch."""
    return F.batch_norm(z, None, None, training=True, eps=eps)


@register_method
class SRD(KnowledgeTerm):
    """SRD: a linear projector on the student's pooled penultimate feature, matched to the *batch-normalised*
    teacher feature with a log-sum distance, plus KD on the logits.

    With ``h_S``, ``h_T`` the student's / teacher's penultimate features pooled over positions, ``P`` the
    projector (``nn.Linear`` onto the teacher's width) and ``BN`` batch normalisation without affine
    parameters (batch statistics, ``eps = 1e-4``) applied to both sides::

        L = feature_weight * log( sum_{b, c} |BN(P h_S) - BN(h_T)|^exponent )
          + kl_weight * KL(softmax(z_t / tau) || softmax(z_s / tau))            (batchmean)

    The paper's finding this encodes: the projector plus the teacher-side normalisation, not an elaborate
    loss, carry most of feature distillation. Follows torchdistill's ``SRDLoss`` (``2 * log(sum(|d|^p)) +
    KL``, ``KLDivLoss(reduction='batchmean')`` with no ``tau^2``) and ``SRDModelWrapper`` (mean over positions,
    ``Linear`` on the student only, ``BatchNorm1d(affine=False, eps=1e-4)`` on both), with the settings of its
    official config ``configs/official/ilsvrc2012/roymiles/aaai2024/srd-resnet18_from_resnet34.yaml``:
    ``exponent = 4``, ``tau = 1``, so ``feature_weight = 2``, ``kl_weight = 1``. Where kdray differs: the BN
    always uses the batch's statistics (the paper's "batch-normalised teacher features"; in torchdistill the
    teacher wrapper's BN uses batch statistics only while the teacher module is in training mode, running
    statistics otherwise), so a batch needs >= 2 samples; and the sum inside the log is floored at ``1e-12``
    (identical features would give ``log 0``). The feature term is a log, so it is negative once the summed
    distance is below 1: only its gradient, ``p |d|^(p-1) / sum |d|^p``, matters.

    Not kdray's ``srrl``: that is Yang et al. (ICLR 2021), "Softmax Regression Representation Learning", which
    the issues also abbreviate SRD; this is the AAAI 2024 method torchdistill calls SRD.

    Points: one pair, the penultimate embedding (``feature_index=-1``). ``weight`` scales both terms (1: the
    config's ``weight: 1.0`` of the whole ``SRDLoss``).
    """

    name = "srd"
    kind = "feature"
    paper = "Miles & Mikolajczyk 2024, Understanding the Role of the Projector in Knowledge Distillation (AAAI)"
    default_student_points = "embedding"
    default_teacher_points = "embedding"

    def __init__(self, weight: float = 1.0, feature_weight: float = 2.0, kl_weight: float = 1.0,
                 exponent: float = 4.0, temperature: float = 1.0, feature_index: int = -1):
        super().__init__()
        if weight < 0 or feature_weight < 0 or kl_weight < 0:
            raise ValueError(f"srd.weight, srd.feature_weight and srd.kl_weight must be >= 0, got {weight}, "
                             f"{feature_weight} and {kl_weight}")
        self.weight = weight
        if exponent <= 0 or temperature <= 0:
            raise ValueError(f"srd.exponent and srd.temperature must be > 0, got {exponent} and {temperature}")
        self.feature_weight = feature_weight
        self.kl_weight = kl_weight
        self.exponent = exponent
        self.temperature = temperature
        self.feature_index = feature_index
        self.projector: nn.Linear | None = None

    def build(self, student: ModelOutput, teacher: ModelOutput, num_samples: int) -> None:
        pair = pick_pair(self, student, teacher, self.feature_index)
        s_c, t_c = pair.student.shape[1], pair.teacher.shape[1]
        self.projector = nn.Linear(s_c, t_c).to(device=pair.student.device, dtype=pair.student.dtype)

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        if self.projector is None:
            raise not_built(self.name)
        if teacher.logits.shape != student.logits.shape:
            raise ValueError(f"srd: student logits {tuple(student.logits.shape)} and teacher logits "
                             f"{tuple(teacher.logits.shape)} differ in shape (same batch and classes needed)")
        pair = pick_pair(self, student, teacher, self.feature_index)
        s_raw, t_raw = student.features[pair.student_path], teacher.features[pair.teacher_path]
        h_s, h_t = pooled(pair.student), pooled(pair.teacher)
        if h_s.shape[1] != self.projector.in_features or h_t.shape[1] != self.projector.out_features:
            raise shape_error(self.name, pair.student_path, s_raw, pair.teacher_path, t_raw,
                              f"the projector was built for {self.projector.in_features} -> "
                              f"{self.projector.out_features} channels")
        if h_s.shape[0] < 2:
            raise shape_error(self.name, pair.student_path, s_raw, pair.teacher_path, t_raw,
                              "batch normalisation needs a batch of >= 2 samples")
        diff = batch_standardise(self.projector(h_s)) - batch_standardise(h_t)
        feature = diff.abs().pow(self.exponent).sum().clamp_min(LOG_FLOOR).log()
        tau = self.temperature
        kl = F.kl_div(F.log_softmax(student.logits / tau, dim=1), F.log_softmax(teacher.logits / tau, dim=1),
                      reduction="batchmean", log_target=True)
        return {"srd_feature": self.weight * self.feature_weight * feature,
                "srd_kl": self.weight * self.kl_weight * kl}
