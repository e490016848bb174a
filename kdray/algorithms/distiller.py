"""The distiller: a student plus the knowledge terms (and their connectors) that teach it.

It is the one trainable module of a step, so the orchestrator wraps exactly this in DDP: the student
and connectors synchronise their gradients together, while the teacher lives outside it, in ``eval()``
under ``no_grad``, never wrapped. Its ``state_dict`` is what a checkpoint holds; :meth:`export_student`
is what a user gets (no teacher, no connectors).

With several teachers (``num_teachers=M``, the multi-teacher scheme) every feature / relation term is
instantiated once per teacher, so each teacher gets its own connector built from its own feature shapes;
their losses are combined with the ensemble's per-teacher weights (``teacher_out.member_weights``), while
response terms read the ensemble's combined logits. Still one module, so DDP still wraps exactly this.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput
from kdray.algorithms.precision import autocast_off, full_precision
from kdray.models.features import FeatureTap, default_points, unwrap


def expand_points(model: nn.Module, points, role: str) -> list[str]:
    """``None`` -> [], ``"stages"``/``"embedding"`` -> the model's defaults, a list -> itself, a callable ->
    what it answers for the bare model and ``role`` (terms whose points follow the model's depth: text layer maps)."""
    if points is None:
        return []
    if callable(points):
        return expand_points(model, points(unwrap(model), role), role)
    if isinstance(points, str):
        if points in ("stages", "embedding"):
            return default_points(model, points, role)
        return [points]
    out: list[str] = []
    for p in points:
        out += expand_points(model, p, role)
    return out


def call_model(model: nn.Module, inputs):
    """``model(inputs)``; inputs that are a mapping (text: ``input_ids``, ``attention_mask``) as keywords,
    ``model(**inputs)``: the one calling convention of training, evaluation and teachers."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def forward_with_features(model: nn.Module, tap: FeatureTap | None, inputs: torch.Tensor) -> ModelOutput:
    """``model(inputs)`` plus the features ``tap`` captures at its points (none when ``tap`` is ``None``); inputs
    that are a mapping (text: ``input_ids``, ``attention_mask``) are passed as keywords, ``model(**inputs)``."""
    def call():
        return call_model(model, inputs)

    if tap is None:
        return ModelOutput(call())
    with tap.capture() as feats:
        logits = call()
    return ModelOutput(logits, dict(feats))


class ClassOrderError(ValueError):
    """A teacher whose output classes are not the dataset's classes."""


def class_order(teacher_classes: list[str], dataset_classes: list[str]) -> list[int] | None:
    """Indices putting a teacher's logits into the dataset's class order (``logits[:, order]``), or ``None``
    when they already are; a teacher with other class names raises :class:`ClassOrderError` naming them."""
    teacher_set, dataset_set = set(teacher_classes), set(dataset_classes)
    missing = [c for c in dataset_classes if c not in teacher_set]
    extra = [c for c in teacher_classes if c not in dataset_set]
    repeated = sorted({c for c in teacher_classes if teacher_classes.count(c) > 1})
    if missing or extra or repeated:
        parts = [f"missing {missing}" if missing else "", f"extra {extra}" if extra else "",
                 f"repeated {repeated}" if repeated else ""]
        raise ClassOrderError(", ".join(p for p in parts if p))
    position = {c: i for i, c in enumerate(teacher_classes)}
    order = [position[c] for c in dataset_classes]
    return None if order == list(range(len(order))) else order


class Teacher(nn.Module):
    """A frozen teacher: always ``eval()``, ``no_grad``, features captured at the requested points.

    ``train(True)`` is ignored on purpose: a teacher in train mode would update its BN statistics and
    cost extra time per step (torchdistill leaves teachers in train mode; we never do).
    ``class_order`` (see :func:`class_order`) reorders its logits, and nothing else, into the dataset's
    class order, for a teacher trained with another order.
    """

    def __init__(self, model: nn.Module, points: list[str] | None = None, class_order: list[int] | None = None):
        super().__init__()
        self.model = model
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.points = list(dict.fromkeys(points or []))
        self._tap = FeatureTap(model, self.points, role="teacher") if self.points else None
        self.register_buffer("class_order", None if class_order is None else torch.tensor(class_order),
                             persistent=False)
        self.model.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, inputs: torch.Tensor) -> ModelOutput:
        out = forward_with_features(self.model, self._tap, inputs)
        out.logits = self._reorder(out.logits)
        return out

    def _reorder(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.class_order is None else logits.index_select(1, self.class_order)


class Distiller(nn.Module):
    """Student + knowledge terms. ``forward(batch, teacher_out)`` returns logits and named losses.

    The hard-label cross-entropy is added with ``ce_weight`` unless a term already includes it
    (Hinton KD's ``(1 - alpha) * CE``). With no terms this trains a model from scratch.

    ``num_teachers > 1``: each feature / relation term is copied per teacher (``terms`` then holds the
    copies side by side and ``term_teachers[i]`` is the teacher of ``terms[i]``, ``None`` for a term that
    reads the combined output). A copy's loss is weighted by ``teacher_out.member_weights[m]`` and summed
    under the term's own loss name, so ``fitnet`` is the ensemble's FitNet loss; the unweighted per-teacher
    values of the last step are kept in ``member_losses`` (``fitnet_t0``, ...) for inspection.
    """

    def __init__(self, student: nn.Module, terms: list[KnowledgeTerm] | None = None, ce_weight: float = 1.0,
                 num_teachers: int = 1):
        super().__init__()
        self.student = student
        self.num_teachers = 1
        self.terms = nn.ModuleList(terms or [])
        self.term_teachers: list[int | None] = [None] * len(self.terms)
        self.member_points: dict[int, list[str]] = {}
        self.member_losses: dict[str, torch.Tensor] = {}
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
        self._resolved = False
        self._view_teacher: tuple[Teacher, ...] = ()  # a tuple: the teacher must not become a submodule
        self.set_num_teachers(num_teachers)

    def set_num_teachers(self, num_teachers: int) -> None:
        """Be taught by ``num_teachers`` teachers: copy each feature / relation term once per teacher.
        Call before :meth:`resolve_teacher_points` and :meth:`build` (the copies are not built yet)."""
        if num_teachers < 1:
            raise ValueError(f"num_teachers must be >= 1, got {num_teachers}")
        if num_teachers == self.num_teachers:
            return
        if self.num_teachers != 1 or self._resolved or (self._built and self.terms):
            raise RuntimeError(f"set_num_teachers({num_teachers}) must come before teachers are resolved or "
                               f"built, on a one-teacher distiller")
        expanded: list[KnowledgeTerm] = []
        self.term_teachers = []
        for term in self.terms:
            if num_teachers > 1 and term.kind != "response":  # one copy (its own connector) per teacher
                expanded += [term] + [copy.deepcopy(term) for _ in range(num_teachers - 1)]
                self.term_teachers += list(range(num_teachers))
            else:
                expanded.append(term)
                self.term_teachers.append(None)
        self.terms = nn.ModuleList(expanded)
        self.num_teachers = num_teachers

    def resolve_teacher_points(self, teacher_model: nn.Module, member: int | None = None) -> list[str]:
        """Expand each term's teacher feature points against the teacher; the union is what it must emit.

        With several teachers, call it once per teacher with ``member=m``: it resolves the copies that
        teacher ``m`` teaches (teachers may differ in architecture, so their points differ)."""
        if self.num_teachers > 1 and member is None:
            raise ValueError(f"this distiller has {self.num_teachers} teachers: resolve each with member=m")
        self._resolved = True
        role = "teacher" if member is None else f"teacher {member}"
        points: list[str] = []
        for term, slot in zip(self.terms, self.term_teachers):
            if slot != member:
                continue
            term.teacher_points = expand_points(teacher_model, getattr(term, "teacher_points_request", None), role)
            points += term.teacher_points
        points = list(dict.fromkeys(points))
        if member is None:
            self.teacher_points = list(dict.fromkeys(self.teacher_points + points))
            return self.teacher_points
        self.member_points[member] = points
        return points

    def student_forward(self, inputs: torch.Tensor) -> ModelOutput:
        return forward_with_features(self.student, self._tap, inputs)

    @torch.no_grad()
    def build(self, example_inputs: torch.Tensor, teacher: Teacher | None, num_samples: int = 0) -> None:
        """Create the terms' connectors from one example batch; call before making the optimizer.

        Connectors follow the features' device and dtype; features that came out in bf16 / fp16 (a build
        under autocast) are upcast first, so connector weights are never low-precision master weights."""
        if self._built:
            return
        self._view_teacher = check_view_teacher(self.terms, teacher)
        was_training = self.student.training
        self.student.eval()
        s_out = self.student_forward(example_inputs).in_full_precision()
        t_out = teacher(example_inputs) if teacher is not None else ModelOutput(s_out.logits)
        with autocast_off(s_out.logits):
            for term, slot in zip(self.terms, self.term_teachers):
                bind = getattr(term, "bind_teacher_model", None)  # terms that reuse a teacher module (SRRL's head)
                if callable(bind):
                    bind(teacher_module(teacher, slot))
                bind = getattr(term, "bind_student_model", None)  # terms that follow the student (mean teacher)
                if callable(bind):
                    bind(self.student)
                term.build(select_points(s_out, term.student_points),
                           _teacher_view(t_out, slot, term).in_full_precision(), num_samples)
        self.student.train(was_training)
        self._built = True

    def set_epoch(self, epoch: int) -> None:
        for term in self.terms:
            term.set_epoch(epoch)

    def after_step(self) -> None:
        """After each optimizer step (called by the loop): every term's :meth:`KnowledgeTerm.after_step`."""
        for term in self.terms:
            term.after_step()

    def set_process_group(self, group) -> None:
        """Hand every term the group of the ranks that split this distiller's batches (its DDP group)."""
        for term in self.terms:
            term.set_process_group(group)

    def forward(self, batch: Batch, teacher_out: ModelOutput | None = None):
        s_out = self.student_forward(batch.inputs)
        losses: dict[str, torch.Tensor] = {}
        if self._adds_ce and self.ce_weight and all(t.uses_hard_labels() for t in self.terms):
            losses["ce"] = self.ce_weight * hard_label_ce(full_precision(s_out.logits), batch.targets)
        member_weights = None
        for term, slot in zip(self.terms, self.term_teachers):
            if teacher_out is None and term.needs_teacher:
                raise ValueError(f"method {term.name!r} needs a teacher, but this stage has none")
            s_in = select_points(s_out, term.student_points)
            t_in = ModelOutput(s_out.logits.detach()) if teacher_out is None else _teacher_view(teacher_out, slot, term)
            views = term.extra_inputs(batch)
            if views is not None:  # SSKD's rotations: both models' outputs on them, handed over with the batch's
                s_in.views = select_points(self.student_forward(views), term.student_points)
                if term.teacher_sees_views:
                    t_in.views = select_points(self._view_teacher[0](views), term.teacher_points).in_full_precision()
            out = term(s_in, t_in, batch)
            if slot is not None:
                if member_weights is None:
                    member_weights = getattr(teacher_out, "member_weights", None)
                    if member_weights is None:
                        member_weights = torch.full((self.num_teachers,), 1.0 / self.num_teachers)
                    member_weights = member_weights.to(s_out.logits.device)
                self.member_losses.update({f"{key}_t{slot}": value.detach() for key, value in out.items()})
                out = {key: member_weights[slot] * value for key, value in out.items()}
            for key, value in out.items():
                losses[key] = losses[key] + value if key in losses else value
        return s_out.logits, losses

    def export_student(self) -> nn.Module:
        """The bare student (no connectors, no DDP wrapper) for saving and serving."""
        return unwrap(self.student)


def hard_label_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the labels: one per sample (``(B, C)`` logits), or one per token (``(B, L, V)``
    logits, ``(B, L)`` targets: masked-LM labels, -100 where a token is not predicted, the positions BERT's
    MLM loss averages over). A batch without any label (all -100) gives 0, not the NaN of an empty mean."""
    if logits.dim() > 2:
        logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    if not bool((targets != -100).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, targets, ignore_index=-100)


def token_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, batch: Batch):
    """Per-token logits ``(B, L, V)`` as the ``(N, V)`` rows of the tokens the batch attends to (its
    ``attention_mask``; all when it has none), so a per-sample soft loss averages over real tokens, not over
    padding (DistilBERT's default soft-target mask); ``(B, C)`` logits are returned as they are."""
    if student_logits.dim() <= 2:
        return student_logits, teacher_logits
    mask = batch.inputs.get("attention_mask") if isinstance(batch.inputs, dict) else None
    keep = (torch.ones(student_logits.shape[:-1], dtype=torch.bool, device=student_logits.device) if mask is None
            else mask.bool())
    return student_logits[keep], teacher_logits[keep]


def check_view_teacher(terms, teacher) -> tuple[Teacher, ...]:
    """The teacher that runs on the terms' :meth:`~KnowledgeTerm.extra_inputs`, when a term has them: it must be
    one in-process :class:`Teacher`; a cache (outputs of the training inputs only) is refused in one line."""
    wanting = [t.name for t in terms if type(t).extra_inputs is not KnowledgeTerm.extra_inputs and t.teacher_sees_views]
    if not wanting:
        return ()
    if not isinstance(teacher, Teacher):
        what = ("no teacher" if teacher is None else "a teacher cache" if getattr(teacher, "wants_batch", False)
                else f"a {type(teacher).__name__}")
        raise ValueError(f"method {wanting[0]!r} runs the teacher on extra views of each batch, but this stage has "
                         f"{what}; give one live teacher (teacher.train, checkpoint or mlflow_uri, no cache)")
    return (teacher,)


def teacher_module(teacher: nn.Module | None, member: int | None = None) -> nn.Module | None:
    """The teacher's own network (teacher ``member``'s in an in-process ensemble), for the terms that reuse
    part of it (``bind_teacher_model``); ``None`` where only its outputs are at hand (a cache, a remote shard)."""
    if member is not None:
        members = getattr(teacher, "teachers", None)
        teacher = members[member] if members is not None and member < len(members) else None
    model = getattr(teacher, "model", None)
    return model if isinstance(model, nn.Module) else None


def select_points(out: ModelOutput, points: list[str]) -> ModelOutput:
    """``out`` with only the feature points a term asked for (what the term is called with)."""
    return ModelOutput(out.logits, {p: out.features[p] for p in points})


def _teacher_view(out: ModelOutput, member: int | None, term: KnowledgeTerm) -> ModelOutput:
    """What ``term`` sees of the teacher: teacher ``member``'s own output, or the (combined) output."""
    if member is None:
        return select_points(out, term.teacher_points)
    members = getattr(out, "members", None)
    if members is None or member >= len(members):
        raise ValueError(f"method {term.name!r} is taught per teacher, but the teacher output holds "
                         f"{0 if members is None else len(members)} teachers' outputs (an ensemble's members)")
    return select_points(members[member], term.teacher_points)
