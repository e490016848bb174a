"""Sentence-embedding distillation: the student's pooled embedding regresses the teacher's.

Reimers & Gurevych, "Making Monolingual Sentence Embeddings Multilingual using Knowledge Distillation"
(EMNLP 2020) train a student so that its sentence embedding equals the teacher's, with the mean squared error
(sentence-transformers' ``MSELoss``: the mean over the batch *and* the dimensions); the cosine form
(``1 - cos``, DistilBERT's cosine-embedding loss applied to the pooled vector) matches only the direction,
which is all that cosine-similarity search reads. Both read the feature point ``embedding`` by default: a text
model's masked-mean-pooled sentence embedding (:mod:`kdray.models.text`), an image model's penultimate feature.

Where the widths differ (a 128-wide student of a 384-wide teacher) a learned linear projection ``W`` (no
bias) maps the student's embedding to the teacher's width, as TinyBERT's ``W_h``; the paper distils students
of the teacher's width, where ``W`` is not made and the student's own embedding is matched.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method


class EmbeddingTerm(KnowledgeTerm):
    """Shared shape handling: one student and one teacher point, ``(B, D)`` (anything else flattened), the
    projection made in :meth:`build` when the widths differ."""

    kind = "feature"
    default_student_points = "embedding"
    default_teacher_points = "embedding"

    def __init__(self, weight: float = 1.0):
        super().__init__()
        if weight < 0:
            raise ValueError(f"{self.name}.weight must be >= 0, got {weight}")
        self.weight = weight
        self.projection: nn.Module | None = None

    def _vectors(self, student: ModelOutput, teacher: ModelOutput) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self.student_points) != 1 or len(self.teacher_points) != 1:
            raise ValueError(f"{self.name}: needs one student and one teacher point (the sentence embeddings); got "
                             f"student {self.student_points} and teacher {self.teacher_points}")
        s = student.features[self.student_points[0]].flatten(1)
        t = teacher.features[self.teacher_points[0]].flatten(1)
        if s.shape[0] != t.shape[0]:
            raise ValueError(f"{self.name}: batch sizes differ (student {s.shape[0]}, teacher {t.shape[0]})")
        return s, t

    def build(self, student: ModelOutput, teacher: ModelOutput, num_samples: int) -> None:
        s, t = self._vectors(student, teacher)
        if s.shape[1] != t.shape[1]:
            self.projection = nn.Linear(s.shape[1], t.shape[1], bias=False).to(device=s.device, dtype=s.dtype)

    def pair(self, student: ModelOutput, teacher: ModelOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's embedding (projected to the teacher's width when they differ) and the teacher's."""
        s, t = self._vectors(student, teacher)
        if s.shape[1] != t.shape[1]:
            if self.projection is None:
                raise RuntimeError(f"{self.name}: widths differ ({s.shape[1]} vs {t.shape[1]}) and the projection "
                                   f"is not built; call Distiller.build first")
            s = self.projection(s)
        return s, t.detach()


@register_method
class EmbeddingMSE(EmbeddingTerm):
    """``weight * mean_{i,d} (s_id - t_id)^2`` between the student's sentence embedding ``s`` (projected when
    the widths differ) and the teacher's ``t`` (Reimers & Gurevych 2020; sentence-transformers' ``MSELoss``).
    ``normalize``: L2-normalise both first, for a teacher whose embeddings are used normalised (all-MiniLM-L6-v2
    ends with a Normalize module); then the loss is ``(2 - 2 cos) / D``, a cosine loss scaled by the width."""

    name = "embedding_mse"
    paper = ("Reimers, Gurevych 2020, Making Monolingual Sentence Embeddings Multilingual using Knowledge "
             "Distillation")

    def __init__(self, weight: float = 1.0, normalize: bool = False):
        super().__init__(weight)
        self.normalize = bool(normalize)

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        s, t = self.pair(student, teacher)
        if self.normalize:
            s, t = F.normalize(s, dim=1), F.normalize(t, dim=1)
        return {"embedding_mse": self.weight * F.mse_loss(s, t)}


@register_method
class EmbeddingCosine(EmbeddingTerm):
    """``weight * mean_i (1 - cos(s_i, t_i))``: the student's sentence embedding turned towards the teacher's,
    its length free (what cosine-similarity search and retrieval read)."""

    name = "embedding_cosine"
    paper = ("Reimers, Gurevych 2020, Making Monolingual Sentence Embeddings Multilingual using Knowledge "
             "Distillation (cosine form; Sanh et al. 2019, DistilBERT's cosine-embedding loss)")

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        s, t = self.pair(student, teacher)
        return {"embedding_cosine": self.weight * (1.0 - F.cosine_similarity(s, t, dim=1, eps=1e-8)).mean()}
