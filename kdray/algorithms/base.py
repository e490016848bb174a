"""The one interface every distillation method implements, and the registry that names them.

A :class:`KnowledgeTerm` receives the student's and the teacher's outputs (logits plus the feature
points it asked for) and the targets, and returns a dict of *named, already weighted* loss tensors.
It owns its learnable connectors (regressors, embeddings, memory banks), so the trainer is the same
for every method (the mdistiller shape), and any term works in any scheme.
"""
from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn

from kdray.algorithms.precision import autocast_off, full_precision

KINDS = ("response", "feature", "relation")
# the built-in method packages (``kdray.algorithms.<package>``): one per kind, plus terms grouped by modality
PACKAGES = KINDS + ("text",)


@dataclass
class ModelOutput:
    """What one model produced for a batch: logits and the features at the requested points."""

    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)

    def in_full_precision(self) -> "ModelOutput":
        """This output with ``float16`` / ``bfloat16`` logits and features upcast to ``float32`` (other dtypes
        kept); ``self`` when nothing needs upcasting. Extra attributes (an ensemble's ``members``) are kept."""
        tensors = [self.logits, *self.features.values()]
        extras = {k: v for k, v in self.__dict__.items() if k not in ("logits", "features")}
        # nested outputs (a term's ``views``: the models' outputs on its extra inputs) are upcast too
        nested = {k: v.in_full_precision() for k, v in extras.items() if isinstance(v, ModelOutput)}
        if not any(full_precision(t) is not t for t in tensors) and all(nested[k] is extras[k] for k in nested):
            return self
        out = ModelOutput(full_precision(self.logits), {k: full_precision(v) for k, v in self.features.items()})
        out.__dict__.update({**extras, **nested})
        return out


@dataclass
class Batch:
    inputs: torch.Tensor
    targets: torch.Tensor
    indices: torch.Tensor


class KnowledgeTerm(nn.Module):
    """Base class of a method. Subclasses set the class attributes and implement :meth:`forward`.

    ``student_points`` / ``teacher_points`` are module paths; ``None`` means "no features",
    ``"stages"`` / ``"embedding"`` mean the model's declared defaults (``kd_stages`` / ``kd_embedding``).
    Terms that need shapes to build connectors implement :meth:`build` which the distiller calls
    once with example features, before the optimizer is created.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    default_student_points: ClassVar[str | list[str] | None] = None
    default_teacher_points: ClassVar[str | list[str] | None] = None
    provides_ce: ClassVar[bool] = False  # True when the term already includes the hard-label CE
    # "text": needs the transformer feature-point contract (kdray.algorithms.text); "any": logits / module paths
    modality: ClassVar[str] = "any"
    # False for self-distillation terms (CS-KD, mean teacher): with no term needing one, a stage runs without
    # a teacher and the loop skips the teacher forward; such a term is called with the student's detached output
    needs_teacher: ClassVar[bool] = True
    # True when the term reads batches of class pairs (CS-KD: the second half's sample i has the class of the
    # first half's sample i), which the loaders then make (:class:`kdray.data.ClassPairBatchSampler`)
    needs_class_pairs: ClassVar[bool] = False
    # False when only the student is run on :meth:`extra_inputs` (soft randomisation: the student on noisy
    # inputs against the teacher on the clean batch); then a teacher cache serves the term as well
    teacher_sees_views: ClassVar[bool] = True

    def __init__(self):
        super().__init__()
        self.student_points: list[str] = []
        self.teacher_points: list[str] = []

    def build(self, student: ModelOutput, teacher: ModelOutput, num_samples: int) -> None:
        """Create connectors from example outputs (shapes) and the training-set size (memory banks).

        Called once, under ``no_grad``, before the optimizer exists. Connectors and buffers follow the
        example features' device *and* dtype (``.to(device=f.device, dtype=f.dtype)``), so a float64 model gets
        float64 connectors. Default: nothing to build.
        """

    def set_epoch(self, epoch: int) -> None:
        """Called at the start of each epoch; terms with warm-up or pre-training phases override it."""

    def set_process_group(self, group) -> None:
        """The ``torch.distributed`` group this term's collectives must use, handed by the orchestrator
        (``None``: communicate nothing). Terms that communicate (CRD's memory bank) override it and use
        only this group: which ranks share a term's data depends on the placement (in peer-parallel
        online training the world holds other peers), which only the orchestrator knows. Default: no-op.
        """

    def extra_inputs(self, batch: Batch) -> torch.Tensor | None:
        """More inputs the term needs both models' outputs on (SSKD's rotated views), or ``None``. The distiller
        runs the student and the teacher on them and hands the outputs over as ``student.views`` /
        ``teacher.views``; such a term needs a live teacher (a cache holds only the training inputs' outputs)."""
        return None

    def after_step(self) -> None:
        """Called by the loop after each optimizer step (the mean teacher's EMA update). Default: nothing."""

    def uses_hard_labels(self) -> bool:
        """``False`` during a pre-training phase (FitNet hints, FT paraphraser): the distiller then
        drops the hard-label CE for that step, so only this term's loss trains."""
        return True

    def __call__(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        """:meth:`forward` in full precision, whatever autocast is active around the call.

        The one place that keeps every term's softmax / log-softmax / KL / log-sum-exp (and its connectors
        and relation matrices) out of bf16 / fp16: autocast is switched off for the device and the inputs
        are upcast to ``float32`` (``float64`` stays ``float64``). See :mod:`kdray.algorithms.precision`.
        """
        with autocast_off(student.logits):
            return super().__call__(student.in_full_precision(), teacher.in_full_precision(), batch)

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError


_METHODS: dict[str, type[KnowledgeTerm]] = {}


class UnknownMethodError(ValueError):
    pass


def register_method(cls: type[KnowledgeTerm]) -> type[KnowledgeTerm]:
    """Class decorator: register a term under its ``name``."""
    if not cls.name or cls.kind not in KINDS:
        raise ValueError(f"{cls.__name__} needs a name and a kind in {KINDS}")
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} is registered twice")
    _METHODS[cls.name] = cls
    return cls


def _load_builtin_methods():
    """Import every module of the built-in method packages (``kdray.algorithms.<package>``, :data:`PACKAGES`)
    by name: each registers its terms. The registry depends on no method; the methods depend on it."""
    import importlib
    import pkgutil

    for package in PACKAGES:
        sub = importlib.import_module(f"{__package__}.{package}")
        for info in pkgutil.iter_modules(sub.__path__):
            importlib.import_module(f"{sub.__name__}.{info.name}")


def list_methods() -> dict[str, type[KnowledgeTerm]]:
    _load_builtin_methods()
    return dict(sorted(_METHODS.items()))


def method_params(name: str) -> dict[str, inspect.Parameter]:
    cls = get_method(name)
    return {k: p for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}


def get_method(name: str) -> type[KnowledgeTerm]:
    _load_builtin_methods()
    if name not in _METHODS:
        close = difflib.get_close_matches(name, list(_METHODS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownMethodError(f"unknown method {name!r}{hint} (see `kdray list methods`)")
    return _METHODS[name]


def create_method(name: str, student_points=None, teacher_points=None, **params) -> KnowledgeTerm:
    """Build a registered term; unknown parameters fail naming the allowed ones.

    ``student_points`` / ``teacher_points`` override the method's default feature points
    (module paths, or ``"stages"`` / ``"embedding"``).
    """
    allowed = method_params(name)
    unknown = set(params) - set(allowed)
    if unknown:
        raise ValueError(f"method {name!r} has no parameter(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    term = get_method(name)(**params)
    if student_points is not None:
        term.student_points = student_points
    if teacher_points is not None:
        term.teacher_points = teacher_points
    return term
