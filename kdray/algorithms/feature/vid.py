"""Ahn et al., "Variational Information Distillation for Knowledge Transfer" (CVPR 2019)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method
from kdray.algorithms.feature.connectors import feature_pairs, not_built, pool_to_common


def _conv1x1(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, bias=False)


def inverse_softplus(y: float) -> float:
    """``x`` with ``log(1 + exp(x)) = y``."""
    return y + math.log(-math.expm1(-y))


@register_method
class VID(KnowledgeTerm):
    """Variational information distillation: maximise a variational lower bound of ``I(t; s)``.

    At every stage the teacher's feature ``t`` is modelled as Gaussian given the student's ``s``:
    mean ``mu(s)`` from a regressor (three 1x1 convs with ReLUs, the paper's CIFAR setting) and a
    per-channel variance ``sigma_c^2 = softplus(alpha_c) + eps`` shared over positions. The term is
    the negative log-likelihood without its constant ::

        weight * sum_stages mean_{b,c,h,w} [ log(sigma_c) + (t - mu(s))^2 / (2 sigma_c^2) ]

    averaged over elements as in the authors' code and RepDistiller / mdistiller (the paper sums;
    the published weight is for the mean). ``sigma^2`` starts at ``init_pred_var = 5``. The
    regressor's hidden width is the teacher's channel count unless ``mid_channels`` is given
    (RepDistiller / mdistiller). Spatial mismatch: the larger map is adaptive-average-pooled to the
    smaller before the regressor (RepDistiller). The loss can be negative (a log-likelihood).

    Default ``weight=1``: the RepDistiller / mdistiller CIFAR-100 weight; ``eps=1e-5``.
    """

    name = "vid"
    kind = "feature"
    paper = "Ahn, Hu, Damianou, Lawrence, Dai 2019, Variational Information Distillation for Knowledge Transfer"
    default_student_points = "stages"
    default_teacher_points = "stages"

    def __init__(self, weight: float = 1.0, init_pred_var: float = 5.0, eps: float = 1e-5,
                 mid_channels: int | None = None):
        super().__init__()
        if weight < 0:
            raise ValueError(f"vid.weight must be >= 0, got {weight}")
        if eps < 0 or init_pred_var <= eps:
            raise ValueError(f"vid needs init_pred_var > eps >= 0, got init_pred_var={init_pred_var}, eps={eps}")
        if mid_channels is not None and mid_channels < 1:
            raise ValueError(f"vid.mid_channels must be >= 1, got {mid_channels}")
        self.weight = weight
        self.init_pred_var = init_pred_var
        self.eps = eps
        self.mid_channels = mid_channels
        self.regressors: nn.ModuleList | None = None
        self.log_scales: nn.ParameterList | None = None

    def build(self, student: ModelOutput, teacher: ModelOutput, num_samples: int) -> None:
        regressors, log_scales = [], []
        for pair in feature_pairs(self, student, teacher):
            s_c, t_c = pair.student.shape[1], pair.teacher.shape[1]
            mid = self.mid_channels or t_c
            regressors.append(nn.Sequential(
                _conv1x1(s_c, mid), nn.ReLU(), _conv1x1(mid, mid), nn.ReLU(), _conv1x1(mid, t_c),
            ).to(device=pair.student.device, dtype=pair.student.dtype))
            alpha = inverse_softplus(self.init_pred_var - self.eps)
            log_scales.append(nn.Parameter(torch.full((t_c,), alpha, device=pair.student.device,
                                                      dtype=pair.student.dtype)))
        self.regressors = nn.ModuleList(regressors)
        self.log_scales = nn.ParameterList(log_scales)

    def variances(self, index: int) -> torch.Tensor:
        return F.softplus(self.log_scales[index]) + self.eps

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        if self.regressors is None:
            raise not_built(self.name)
        total = 0.0
        for pair in feature_pairs(self, student, teacher):
            s, t = pool_to_common(pair.student, pair.teacher)
            mean = self.regressors[pair.index](s)
            var = self.variances(pair.index).view(1, -1, 1, 1)
            nll = 0.5 * ((mean - t).pow(2) / var + torch.log(var))
            total = total + nll.mean()
        return {"vid": self.weight * total}
