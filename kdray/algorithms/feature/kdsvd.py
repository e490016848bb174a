"""Lee, Kim, Song, "Self-supervised Knowledge Distillation Using Singular Value Decomposition" (ECCV 2018)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method
from kdray.algorithms.feature.connectors import conv_bn, feature_pairs, not_built, shape_error


class _SingularValuesAndRightVectors(torch.autograd.Function):
    """Thin SVD ``X = U diag(S) V^T`` returning ``(S, V)``, whose backward drops the non-finite terms.

    The backward is the standard one for ``(S, V)`` (Townsend's, with ``dL/dU = 0``)::

        dX = U [diag(dS) + diag(S) (F o (V^T dV - dV^T V))] V^T + U diag(S)^-1 dV^T (I - V V^T)

    with ``F_ij = 1 / (S_j^2 - S_i^2)`` off the diagonal. Where singular values repeat (a post-ReLU map with
    dead channels has many zeros) ``F`` or ``1/S`` are infinite while their factor is zero (the unused,
    truncated vectors get no gradient), and autograd's SVD returns NaN; here those terms are zero. Elsewhere
    it equals autograd's SVD gradient (tested). The public port zeroes non-finite values in the forward only."""

    @staticmethod
    def forward(ctx, x):
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        v = vh.transpose(-2, -1)
        ctx.save_for_backward(u, s, v)
        return s, v

    @staticmethod
    def backward(ctx, grad_s, grad_v):
        u, s, v = ctx.saved_tensors
        s2 = s.pow(2)
        f = 1.0 / (s2.unsqueeze(-2) - s2.unsqueeze(-1))
        f = torch.where(torch.isfinite(f), f, torch.zeros_like(f))
        f.diagonal(dim1=-2, dim2=-1).zero_()
        vt_gv = v.transpose(-2, -1) @ grad_v
        inner = torch.diag_embed(grad_s) + s.unsqueeze(-1) * (f * (vt_gv - vt_gv.transpose(-2, -1)))
        grad_x = u @ inner @ v.transpose(-2, -1)
        s_inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
        proj = grad_v.transpose(-2, -1) - vt_gv.transpose(-2, -1) @ v.transpose(-2, -1)  # dV^T (I - V V^T)
        grad_x = grad_x + u @ (s_inv.unsqueeze(-1) * proj)
        return torch.where(torch.isfinite(grad_x), grad_x, torch.zeros_like(grad_x))


def right_singular_vectors(feature: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of each sample's ``HW x C`` feature matrix: the top ``n`` right singular vectors
    ``(B, C, n)`` (channel space, each l2-normalised) and their singular values ``(B, n)``, l2-normalised."""
    s, v = _SingularValuesAndRightVectors.apply(feature.flatten(2).transpose(1, 2))
    return F.normalize(v[:, :, :n], dim=1), F.normalize(s[:, :n], dim=1)


def align_to_teacher(v_s: torch.Tensor, v_t: torch.Tensor) -> torch.Tensor:
    """For each teacher vector, the student candidate of largest ``|cosine|``, sign-flipped to agree
    with it: ``(B, C, n_s), (B, C, k) -> (B, C, k)``. Ties pick every tied candidate (a zero cosine
    everywhere gives a zero vector: sign 0)."""
    cosine = v_s.transpose(1, 2) @ v_t  # (B, n_s, k)
    best = cosine.abs().amax(dim=1, keepdim=True)
    mask = torch.where(cosine.abs() == best, torch.sign(cosine), torch.zeros_like(cosine)).detach()
    return v_s @ mask


def rbf_correlation(v: torch.Tensor, v_prev: torch.Tensor, sigma: float) -> torch.Tensor:
    """``exp(-(v[c, j] - v_prev[c', j])^2 / sigma)`` for every channel pair of two consecutive points and
    each singular index ``j``: ``(B, C, k), (B, C', k) -> (B, C, C', k)``."""
    return torch.exp(-(v.unsqueeze(2) - v_prev.unsqueeze(1)).pow(2) / sigma)


@register_method
class KDSVD(KnowledgeTerm):
    """KD-SVD: the correlation between the compressed feature maps of consecutive points is distilled.

    At each point the map (``HW x C`` per sample) is compressed by a truncated SVD to its top ``k``
    right singular vectors ``V`` (channel space). Post-processing: the student keeps ``k + 3`` candidates
    (at most the matrix rank) and, for each teacher vector, the candidate of largest ``|cosine|`` with it,
    sign-flipped to agree (this removes SVD's sign ambiguity and the ordering ambiguity of close
    singular values); both are scaled by the teacher's l2-normalised singular values. Between
    consecutive points ``l-1, l`` the radial-basis correlation ``G[c, c', j] = exp(-(V_l[c, j] -
    V_{l-1}[c', j])^2 / sigma)`` is taken and::

        L = weight * sum_l 1/B * sum_{b, c, c', j} (G^S_l - G^T_l)^2

    Followed from the authors' TensorFlow code as ported by Knowledge-Distillation-Zoo (``KDSVD``): the
    ``k + 3`` candidates, the RBF taken entry-wise per singular index with ``sigma = 8``, the sum
    reduction over the batch mean and non-finite entries zeroed; the SVD's backward also drops its
    non-finite terms (:class:`_SingularValuesAndRightVectors`), so dead channels make no NaN gradients.
    The paper's text was not re-checked for these details beyond the RBF, the sign alignment and the
    singular-value weighting it describes.

    Departures: the port reshapes with ``H * H`` (square maps); we use ``H * W``. The method needs the
    same channel count at each pair of points (the paper's students keep the teacher's widths); where
    they differ a 1x1 conv + BN connector maps the student onto the teacher's channels (a kdray
    addition). The spatial sizes may differ (``V`` lives in channel space). At least two points.

    Defaults ``k=1``, ``sigma=8``, ``weight=1`` (the port's values; the loss is used unweighted).
    """

    name = "kdsvd"
    kind = "feature"
    paper = "Lee, Kim, Song 2018, Self-supervised Knowledge Distillation Using Singular Value Decomposition"
    default_student_points = "stages"
    default_teacher_points = "stages"

    def __init__(self, weight: float = 1.0, k: int = 1, sigma: float = 8.0):
        super().__init__()
        if weight < 0:
            raise ValueError(f"kdsvd.weight must be >= 0, got {weight}")
        if k < 1:
            raise ValueError(f"kdsvd.k must be >= 1, got {k}")
        if sigma <= 0:
            raise ValueError(f"kdsvd.sigma must be > 0, got {sigma}")
        self.weight = weight
        self.k = k
        self.sigma = sigma
        self.connectors: nn.ModuleList | None = None

    def _pairs(self, student: ModelOutput, teacher: ModelOutput):
        pairs = feature_pairs(self, student, teacher)
        if len(pairs) < 2:
            raise ValueError(f"kdsvd: needs at least two pairs of points (it correlates consecutive ones); "
                             f"got student {list(self.student_points)} and teacher {list(self.teacher_points)}")
        for p in pairs:
            if min(p.teacher.shape[1], p.teacher.shape[-2] * p.teacher.shape[-1]) < self.k:
                raise shape_error(self.name, p.student_path, p.student, p.teacher_path, p.teacher,
                                  f"k={self.k} singular vectors need a rank of at least {self.k} "
                                  f"(min(C, H*W) of the teacher map)")
        return pairs

    def build(self, student: ModelOutput, teacher: ModelOutput, num_samples: int) -> None:
        connectors = []
        for p in self._pairs(student, teacher):
            s_c, t_c = p.student.shape[1], p.teacher.shape[1]
            conv = nn.Identity() if s_c == t_c else conv_bn(s_c, t_c)
            connectors.append(conv.to(device=p.student.device, dtype=p.student.dtype))
        self.connectors = nn.ModuleList(connectors)

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        if self.connectors is None:
            raise not_built(self.name)
        loss, prev = 0.0, None
        for pair, connector in zip(self._pairs(student, teacher), self.connectors):
            s = connector(pair.student)
            v_t, s_t = right_singular_vectors(pair.teacher, self.k)
            v_s, _ = right_singular_vectors(s, self.k + 3)
            v_s = align_to_teacher(v_s, v_t)
            v_t, v_s = v_t * s_t.unsqueeze(1), v_s * s_t.unsqueeze(1)
            if prev is not None:
                diff = (rbf_correlation(v_s, prev[0], self.sigma) - rbf_correlation(v_t, prev[1], self.sigma)).pow(2)
                loss = loss + torch.nan_to_num(diff, nan=0.0, posinf=0.0, neginf=0.0).sum() / s.shape[0]
            prev = (v_s, v_t)
        return {"kdsvd": self.weight * loss}
