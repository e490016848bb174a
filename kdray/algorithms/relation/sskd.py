"""Xu, Liu, Li, Loy, "Knowledge Distillation Meets Self-Supervision" (SSKD, ECCV 2020)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method

ROTATIONS = (1, 2, 3)  # quarter turns of the extra views: 90, 180, 270 degrees (the normal view is the batch)


def rotated_views(images: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, H)`` -> ``(3 N, C, H, H)``: the batch turned by 90, 180 and 270 degrees, view-major (rows
    ``k N .. (k + 1) N - 1`` are turn ``k + 1``), so the extra row ``r`` is a view of sample ``r % N``."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[-1] != images.shape[-2]:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"sskd: rotated views need square image batches (N, C, H, H), got {shape}")
    return torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in ROTATIONS])


def rank_of(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per row, the position of ``targets[row]`` when the row's scores are sorted from high to low (0: the top).
    A stable sort, so ties keep the lower index first."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return (order == targets[:, None]).int().argmax(dim=1)


def confident_rows(scores: torch.Tensor, targets: torch.Tensor, keep_wrong: float) -> torch.Tensor:
    """SSKD's error-level ranking: the rows where the teacher ranks the right answer first, plus the fraction
    ``keep_wrong`` (rounded down) of the others whose right answer it ranks highest; the kept rows in order."""
    rank = rank_of(scores, targets)
    wrong = int((rank > 0).sum())
    keep = len(rank) - wrong + int(wrong * keep_wrong)
    kept = torch.sort(rank, stable=True).indices[:keep]
    return torch.sort(kept).values


def row_similarities(aug: torch.Tensor, nor: torch.Tensor) -> torch.Tensor:
    """``(3 N, N)`` cosine similarities of each extra view's embedding to each normal sample's."""
    return F.cosine_similarity(aug[:, :, None], nor.t()[None], dim=1)


def kl_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 KL(softmax(t / T) || softmax(s / T))`` averaged over the rows (0 for no rows)."""
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    log_s = F.log_softmax(student_logits / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature**2


@register_method
class SSKD(KnowledgeTerm):
    """SSKD: distil the teacher's predictions and its self-supervised view of the data, on rotated copies.

    The distiller gives this term the batch turned by 90 / 180 / 270 degrees as extra inputs
    (:meth:`extra_inputs`) and hands both models' outputs on them over as ``student.views`` / ``teacher.views``.
    With ``z`` the logits, ``e`` the embeddings (the student's through its projection head) and the views' rows
    ``r`` each a turn of sample ``r % N``, the loss is (the official code's ``student.py``)::

        ce_weight   * CE(z_s, y)                                       (normal view)
        kd_weight   * T^2   KL(softmax(z_t / T)   || softmax(z_s / T))  (normal view)
        tf_weight   * T^2   KL(... same on the rotated views ...)        rows kept by the teacher's class ranking
        ss_weight   * T_ss^2 KL(softmax(S_t / T_ss) || softmax(S_s / T_ss))   rows kept by its view ranking

    where ``S`` is the ``(3N, N)`` matrix of cosine similarities between each rotated view's embedding and every
    normal sample's (row ``r``'s right answer: column ``r % N``). The rows kept ("error-level ranking"): those
    where the teacher ranks the true class (resp. the true source image) first, plus the fraction ``ratio_tf``
    (resp. ``ratio_ss``) of the wrong ones where it ranks it highest. Defaults are the code's: weights 0.1 / 0.9
    / 2.7 / 10, ``T = 4`` (both KD terms), ``T_ss = 0.5``, ``ratio_tf = 1``, ``ratio_ss = 0.75``.

    What is kept and what is not: the four losses, their weights and temperatures, the selection rule (with a
    stable sort, so ties are broken by index; the code's sort is not stable) and the student's two-layer
    projection head (``Linear-ReLU-Linear`` at the embedding's width, a connector of this term). Not kept: the
    code's first stage, 60 epochs training a projection head on the frozen teacher with the contrastive task
    (kdray's teacher is frozen and headless here, so ``S_t`` is computed from its raw embedding), and its single
    joint forward of the 4 N images (the distiller runs the normal batch, then the views, so BatchNorm batch
    statistics are per group). The normal-view CE is this term's (``provides_ce``), at the code's weight.
    A teacher cache (outputs of the unrotated inputs only) cannot serve it: refused when the stage is built.
    """

    name = "sskd"
    kind = "relation"
    paper = "Xu, Liu, Li, Loy 2020, Knowledge Distillation Meets Self-Supervision (ECCV)"
    provides_ce = True
    default_student_points = "embedding"
    default_teacher_points = "embedding"

    def __init__(self, ce_weight: float = 0.1, kd_weight: float = 0.9, tf_weight: float = 2.7,
                 ss_weight: float = 10.0, temperature: float = 4.0, ss_temperature: float = 0.5,
                 ratio_tf: float = 1.0, ratio_ss: float = 0.75):
        super().__init__()
        weights = {"ce_weight": ce_weight, "kd_weight": kd_weight, "tf_weight": tf_weight, "ss_weight": ss_weight}
        bad = {k: v for k, v in weights.items() if v < 0}
        if bad:
            raise ValueError(f"sskd weights must be >= 0, got {bad}")
        if temperature <= 0 or ss_temperature <= 0:
            raise ValueError(f"sskd.temperature and ss_temperature must be > 0, got {temperature} and {ss_temperature}")
        if not (0 <= ratio_tf <= 1 and 0 <= ratio_ss <= 1):
            raise ValueError(f"sskd.ratio_tf and ratio_ss must be in [0, 1], got {ratio_tf} and {ratio_ss}")
        self.ce_weight, self.kd_weight, self.tf_weight, self.ss_weight = ce_weight, kd_weight, tf_weight, ss_weight
        self.temperature, self.ss_temperature = temperature, ss_temperature
        self.ratio_tf, self.ratio_ss = ratio_tf, ratio_ss
        self.head: nn.Module | None = None

    def build(self, student: ModelOutput, teacher: ModelOutput, num_samples: int) -> None:
        feat = self.embedding(student, "student")
        d = feat.shape[1]
        self.head = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d)).to(device=feat.device,
                                                                                   dtype=feat.dtype)

    def extra_inputs(self, batch: Batch) -> torch.Tensor:
        return rotated_views(batch.inputs)

    def embedding(self, out: ModelOutput, role: str) -> torch.Tensor:
        points = self.student_points if role == "student" else self.teacher_points
        if len(points) != 1:
            raise ValueError(f"sskd: needs one {role} feature point (the embedding), got {points}")
        return out.features[points[0]].flatten(1)

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        if self.head is None:
            raise ValueError("sskd: the projection head is not built; call Distiller.build first")
        s_views, t_views = getattr(student, "views", None), getattr(teacher, "views", None)
        if s_views is None or t_views is None:
            raise ValueError("sskd: no outputs on the rotated views; run it through Distiller, which computes them")
        if teacher.logits.shape != student.logits.shape or t_views.logits.shape != s_views.logits.shape:
            raise ValueError(f"sskd: student logits {tuple(student.logits.shape)} / views "
                             f"{tuple(s_views.logits.shape)} and teacher logits {tuple(teacher.logits.shape)} / "
                             f"views {tuple(t_views.logits.shape)} differ in shape (same batch and classes needed)")
        n = student.logits.shape[0]
        if s_views.logits.shape[0] != len(ROTATIONS) * n:
            raise ValueError(f"sskd: {s_views.logits.shape[0]} view outputs for a batch of {n} (need "
                             f"{len(ROTATIONS) * n})")
        own = torch.arange(len(ROTATIONS) * n, device=student.logits.device) % n  # each view's source sample
        ce = F.cross_entropy(student.logits, batch.targets)
        kd = kl_rows(student.logits, teacher.logits.detach(), self.temperature)
        with torch.no_grad():
            keep_tf = confident_rows(t_views.logits, batch.targets[own], self.ratio_tf)
        tf = kl_rows(s_views.logits[keep_tf], t_views.logits.detach()[keep_tf], self.temperature)
        s_sim = row_similarities(self.head(self.embedding(s_views, "student")),
                                 self.head(self.embedding(student, "student")))
        with torch.no_grad():
            t_sim = row_similarities(self.embedding(t_views, "teacher"), self.embedding(teacher, "teacher"))
            keep_ss = confident_rows(t_sim, own, self.ratio_ss)
        ss = kl_rows(s_sim[keep_ss], t_sim[keep_ss], self.ss_temperature)
        return {"ce": self.ce_weight * ce, "sskd_kd": self.kd_weight * kd, "sskd_tf": self.tf_weight * tf,
                "sskd_ss": self.ss_weight * ss}
