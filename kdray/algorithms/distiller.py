"""The distiller: a student plus the knowledge terms (and their connectors) that teach it.

It is the one trainable module of a step, so the orchestrator wraps exactly this in DDP: the student
and connectors synchronise their gradients together, while the teacher lives outside it, in ``eval()``
under ``no_grad``, never wrapped. Its ``state_dict`` is what a checkpoint holds; :meth:`export_student`
is what a user gets (no teacher, no connectors).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput
from kdray.models.features import FeatureTap, default_points, unwrap


def expand_points(model: nn.Module, points, role: str) -> list[str]:
    """``None`` -> [], ``"stages"``/``"embedding"`` -> the model's defaults, a list -> itself."""
    if points is None:
        return []
    if isinstance(points, str):
        if points in ("stages", "embedding"):
            return default_points(model, points, role)
        return [points]
    out: list[str] = []
    for p in points:
        out += expand_points(model, p, role)
    return out


class Teacher(nn.Module):
    """A frozen teacher: always ``eval()``, ``no_grad``, features captured at the requested points.

    ``train(True)`` is ignored on purpose: a teacher in train mode would update its BN statistics and
    cost extra time per step (torchdistill leaves teachers in train mode; we never do).
    """

    def __init__(self, model: nn.Module, points: list[str] | None = None):
        super().__init__()
        self.model = model
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.points = list(dict.fromkeys(points or []))
        self._tap = FeatureTap(model, self.points, role="teacher") if self.points else None
        self.model.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, inputs: torch.Tensor) -> ModelOutput:
        if self._tap is None:
            return ModelOutput(self.model(inputs))
        with self._tap.capture() as feats:
            logits = self.model(inputs)
        return ModelOutput(logits, dict(feats))


class Distiller(nn.Module):
    """Student + knowledge terms. ``forward(batch, teacher_out)`` returns logits and named losses.

    The hard-label cross-entropy is added with ``ce_weight`` unless a term already includes it
    (Hinton KD's ``(1 - alpha) * CE``). With no terms this trains a model from scratch.
    """

    def __init__(self, student: nn.Module, terms: list[KnowledgeTerm] | None = None, ce_weight: float = 1.0):
        super().__init__()
        self.student = student
        self.terms = nn.ModuleList(terms or [])
        self.ce_weight = ce_weight
        self._adds_ce = not any(t.provides_ce for t in self.terms)
        self.student_points: list[str] = []
        self.teacher_points: list[str] = []
        for term in self.terms:
            s_req = term.student_points if term.student_points else term.default_student_points
            t_req = term.teacher_points if term.teacher_points else term.default_teacher_points
            term.student_points = expand_points(student, s_req, "student")
            self.student_points += term.student_points
            term.teacher_points_request = t_req
        self.student_points = list(dict.fromkeys(self.student_points))
        self._tap = FeatureTap(student, self.student_points, role="student") if self.student_points else None
        self._built = not self.terms

    def resolve_teacher_points(self, teacher_model: nn.Module) -> list[str]:
        """Expand each term's teacher feature points against the teacher; the union is what it must emit."""
        for term in self.terms:
            term.teacher_points = expand_points(teacher_model, getattr(term, "teacher_points_request", None),
                                                "teacher")
            self.teacher_points += term.teacher_points
        self.teacher_points = list(dict.fromkeys(self.teacher_points))
        return self.teacher_points

    def student_forward(self, inputs: torch.Tensor) -> ModelOutput:
        if self._tap is None:
            return ModelOutput(self.student(inputs))
        with self._tap.capture() as feats:
            logits = self.student(inputs)
        return ModelOutput(logits, dict(feats))

    @torch.no_grad()
    def build(self, example_inputs: torch.Tensor, teacher: Teacher | None, num_samples: int = 0) -> None:
        """Create the terms' connectors from one example batch; call before making the optimizer."""
        if self._built:
            return
        was_training = self.student.training
        self.student.eval()
        s_out = self.student_forward(example_inputs)
        t_out = teacher(example_inputs) if teacher is not None else ModelOutput(s_out.logits)
        for term in self.terms:
            term.build(_select(s_out, term.student_points), _select(t_out, term.teacher_points), num_samples)
        self.student.train(was_training)
        self._built = True

    def set_epoch(self, epoch: int) -> None:
        for term in self.terms:
            term.set_epoch(epoch)

    def forward(self, batch: Batch, teacher_out: ModelOutput | None = None):
        s_out = self.student_forward(batch.inputs)
        losses: dict[str, torch.Tensor] = {}
        if self._adds_ce and self.ce_weight and all(t.uses_hard_labels() for t in self.terms):
            losses["ce"] = self.ce_weight * F.cross_entropy(s_out.logits, batch.targets)
        for term in self.terms:
            if teacher_out is None:
                raise ValueError(f"method {term.name!r} needs a teacher, but this stage has none")
            out = term(_select(s_out, term.student_points), _select(teacher_out, term.teacher_points), batch)
            for key, value in out.items():
                losses[key] = losses[key] + value if key in losses else value
        return s_out.logits, losses

    def export_student(self) -> nn.Module:
        """The bare student (no connectors, no DDP wrapper) for saving and serving."""
        return unwrap(self.student)


def _select(out: ModelOutput, points: list[str]) -> ModelOutput:
    return ModelOutput(out.logits, {p: out.features[p] for p in points})
