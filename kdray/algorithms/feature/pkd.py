"""Cao et al., "PKD: General Distillation Framework for Object Detectors via Pearson Correlation Coefficient"
(NeurIPS 2022)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method
from kdray.algorithms.feature.connectors import feature_pairs, not_built, pool_to_common, shape_error

STD_EPS = 1e-6


def standardise_channels(x: torch.Tensor, eps: float = STD_EPS) -> torch.Tensor:
    """Each channel of a ``(B, C, H, W)`` map to zero mean and unit (unbiased) standard deviation over its
    ``B * H * W`` values: ``(x - mean) / (std + eps)``."""
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    flat = (flat - flat.mean(dim=1, keepdim=True)) / (flat.std(dim=1, keepdim=True) + eps)
    return flat.reshape(x.shape[1], x.shape[0], *x.shape[2:]).transpose(0, 1)


@register_method
class PKD(KnowledgeTerm):
    """PKD: imitate the teacher's features *up to a per-channel affine map*, i.e. maximise their Pearson
    correlation, so a teacher with larger or shifted activations (another detector, another backbone) does
    not dominate the loss by magnitude.

    Per pair of points, both maps are standardised per channel (zero mean, unit variance over batch and
    positions, :func:`standardise_channels`) and compared with ``mean((s_hat - t_hat)^2) / 2``; for
    standardised vectors of ``n`` values this equals ``(n - 1) / n * (1 - r)`` with ``r`` the Pearson
    correlation, the paper's "1 - r" imitation loss. The pairs are summed and multiplied by ``weight``.

    Follows mmrazor's ``PKDLoss`` (``mmrazor/models/losses/pkd_loss.py``): unbiased ``std`` plus ``1e-6``, the
    ``/ 2``, the sum over pairs. Where it differs: mmrazor resizes the student's map bilinearly to the
    teacher's size; kdray average-pools the larger map to the smaller (its convention for every feature
    method); and mmrazor's FPN pairs always have equal channels, while here a student with other channel
    counts gets a 1x1 convolution (no bias, no BN: the standardisation that follows removes any per-channel
    shift and scale) onto the teacher's channels, as the paper's general framework needs.

    Points: the model stages (all pairs). Default ``weight=6``: mmrazor's Faster R-CNN config
    (``pkd_fpn_frcnn_r101_frcnn_r50_2x_coco.py``; the RetinaNet one uses 10). The paper is about detectors;
    there is no published classification weight.
    """

    name = "pkd"
    kind = "feature"
    paper = ("Cao et al. 2022, PKD: General Distillation Framework for Object Detectors via Pearson Correlation "
             "Coefficient")
    default_student_points = "stages"
    default_teacher_points = "stages"

    def __init__(self, weight: float = 6.0):
        super().__init__()
        if weight < 0:
            raise ValueError(f"pkd.weight must be >= 0, got {weight}")
        self.weight = weight
        self.connectors: nn.ModuleList | None = None

    def build(self, student: ModelOutput, teacher: ModelOutput, num_samples: int) -> None:
        connectors = []
        for pair in feature_pairs(self, student, teacher):
            s_c, t_c = pair.student.shape[1], pair.teacher.shape[1]
            if s_c == t_c:
                connectors.append(nn.Identity())
            else:
                conv = nn.Conv2d(s_c, t_c, 1, bias=False)
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                connectors.append(conv.to(device=pair.student.device, dtype=pair.student.dtype))
        self.connectors = nn.ModuleList(connectors)

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        if self.connectors is None:
            raise not_built(self.name)
        pairs = feature_pairs(self, student, teacher)
        if len(pairs) != len(self.connectors):
            raise ValueError(f"pkd: built for {len(self.connectors)} pairs of points, got {len(pairs)}")
        total = student.logits.new_zeros(())
        for pair, connector in zip(pairs, self.connectors):
            s, t = pool_to_common(connector(pair.student), pair.teacher)
            if s.shape != t.shape:
                raise shape_error(self.name, pair.student_path, student.features[pair.student_path],
                                  pair.teacher_path, teacher.features[pair.teacher_path],
                                  f"after the connector the maps are {tuple(s.shape)} and {tuple(t.shape)}")
            if s.shape[0] * s.shape[2] * s.shape[3] < 2:
                raise shape_error(self.name, pair.student_path, student.features[pair.student_path],
                                  pair.teacher_path, teacher.features[pair.teacher_path],
                                  "a per-channel standard deviation needs >= 2 values (batch x positions)")
            total = total + F.mse_loss(standardise_channels(s), standardise_channels(t)) / 2
        return {"pkd": self.weight * total}
