"""Cross-modal distillation: a teacher that reads modality A teaches a student that reads modality B of the same,
paired samples, most of them unlabelled (Gupta, Hoffman & Malik, "Cross Modal Distillation for Supervision
Transfer", CVPR 2016).

A batch's inputs are a mapping ``{modality: tensor}``; the teacher is given ``inputs[teacher_input]``
(:class:`ModalityTeacher`), the student ``inputs[student_input]`` (:class:`CrossModalDistiller`), in the same
step, so every knowledge term compares the two models on the same samples. Samples without a label carry the
target :data:`UNLABELLED` (PyTorch's ``ignore_index``, -100): the hard-label cross-entropy (the distiller's
``ce_weight`` one, and a term's own, such as ``kd``'s ``(1 - alpha) * CE``) is the mean over the batch's
labelled rows (none: no CE that step), while the knowledge terms (KL on logits, a feature regression) use every
paired row. :class:`CrossModalLoop` marks the rows: ``labelled[i]`` of the training split's sample ``i``.

Paper: the student (depth / optical-flow CNN) regresses the teacher's (RGB CNN) mid-level feature (pool5 or
conv5) with an L2 loss on unlabelled paired images, then is fine-tuned on the few labels of its modality. kdray
trains in one stage: the feature point is an existing feature term on named points (``fitnet`` with
``student_points`` / ``teacher_points``: a connector regresses the student's feature onto the teacher's, the
paper's L2; its ``weight`` replaces the paper's 1), and logits can be matched too (``kd``); the labelled rows'
CE is applied beside them from the start instead of in a later fine-tuning stage.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput
from kdray.algorithms.distiller import Distiller, select_points
from kdray.algorithms.engine import TrainLoop
from kdray.algorithms.precision import full_precision

#: The target of a sample whose label the student may not use (``F.cross_entropy``'s default ``ignore_index``).
UNLABELLED = -100


def pick(inputs, name: str):
    """Modality ``name`` of a mapping of inputs; a single tensor is returned as it is (already one modality)."""
    if isinstance(inputs, Mapping):
        if name not in inputs:
            raise KeyError(f"the batch has no modality {name!r}; it has {', '.join(map(str, inputs))}")
        return inputs[name]
    return inputs


def labelled_mask(targets: torch.Tensor, fraction: float, seed: int, stratified: bool = True) -> torch.Tensor:
    """Which samples keep their label: a bool mask over ``targets``, about ``fraction`` of them, drawn by
    ``seed``. ``stratified``: ``max(1, round(fraction * n_c))`` of each class ``c`` (every class labelled);
    else ``max(1, round(fraction * n))`` samples uniformly at random."""
    if not 0 < fraction <= 1:
        raise ValueError(f"labelled fraction must be in (0, 1], got {fraction}")
    g = torch.Generator().manual_seed(int(seed))
    mask = torch.zeros(len(targets), dtype=torch.bool)
    groups = [torch.nonzero(targets == c).flatten() for c in targets.unique()] if stratified else \
        [torch.arange(len(targets))]
    for members in groups:
        keep = max(1, int(round(fraction * len(members))))
        mask[members[torch.randperm(len(members), generator=g)[:keep]]] = True
    return mask


def labelled_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the rows whose target is not :data:`UNLABELLED`; 0 (with a graph) when none is."""
    labelled = targets != UNLABELLED
    total = F.cross_entropy(full_precision(logits), targets, ignore_index=UNLABELLED, reduction="sum")
    return total / labelled.sum().clamp(min=1)


class ModalityTeacher(nn.Module):
    """A frozen teacher (a :class:`~kdray.algorithms.distiller.Teacher`) that reads modality ``name`` of its
    inputs. ``model`` is the teacher's network (what checkpoints and feature points name)."""

    def __init__(self, teacher: nn.Module, name: str):
        super().__init__()
        self.teacher, self.name = teacher, name

    @property
    def model(self) -> nn.Module:
        return self.teacher.model

    @property
    def class_order(self):
        return self.teacher.class_order

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, inputs) -> ModelOutput:
        return self.teacher(pick(inputs, self.name))


class CrossModalDistiller(Distiller):
    """A :class:`~kdray.algorithms.distiller.Distiller` whose student reads modality ``student_input`` of a
    batch's inputs, and whose hard-label CE counts the labelled rows only (targets :data:`UNLABELLED` are
    unlabelled); knowledge terms see every row. One teacher (its output routed by :class:`ModalityTeacher`)."""

    def __init__(self, student: nn.Module, terms: list[KnowledgeTerm] | None = None, ce_weight: float = 1.0,
                 student_input: str = "profile"):
        super().__init__(student, terms, ce_weight)
        self.student_input = student_input

    def student_forward(self, inputs) -> ModelOutput:
        return super().student_forward(pick(inputs, self.student_input))

    def forward(self, batch: Batch, teacher_out: ModelOutput | None = None):
        s_out = self.student_forward(batch.inputs)
        any_labelled = bool((batch.targets != UNLABELLED).any())
        losses: dict[str, torch.Tensor] = {}
        if self._adds_ce and self.ce_weight and all(t.uses_hard_labels() for t in self.terms):
            losses["ce"] = self.ce_weight * labelled_cross_entropy(s_out.logits, batch.targets)
        own = Batch(pick(batch.inputs, self.student_input), batch.targets, batch.indices)
        for term in self.terms:
            if teacher_out is None:
                raise ValueError(f"method {term.name!r} needs a teacher, but this stage has none")
            out = term(select_points(s_out, term.student_points), select_points(teacher_out, term.teacher_points),
                       own)
            if term.provides_ce and not any_labelled:  # its CE over no labelled row is NaN: no CE this step
                out = {k: v for k, v in out.items() if k != "ce"}
            for key, value in out.items():
                losses[key] = losses[key] + value if key in losses else value
        return s_out.logits, losses


class CrossModalLoop(TrainLoop):
    """A :class:`~kdray.algorithms.engine.TrainLoop` on paired batches where only the samples ``labelled``
    marks (a bool tensor over the training split's indices) keep their targets; the others get
    :data:`UNLABELLED` before the step. The mask is a function of the stage's seed, not checkpoint state."""

    def __init__(self, *, labelled: torch.Tensor, **loop_kwargs):
        super().__init__(**loop_kwargs)
        self.labelled = labelled.to(self.device)

    def step(self, batch: Batch, epoch: int = 0, step: int = 0):
        targets = torch.where(self.labelled[batch.indices], batch.targets,
                              torch.full_like(batch.targets, UNLABELLED))
        return super().step(Batch(batch.inputs, targets, batch.indices), epoch, step)
