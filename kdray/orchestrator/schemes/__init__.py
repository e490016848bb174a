"""Distillation schemes as plug-ins: who teaches whom, as a registry of :class:`Scheme` objects.

Why: a scheme used to be spread over the config checks, the stage planner, the stage dispatch, the job's
post-step, the preflight and the stage graph. Now a scheme is one module that subclasses :class:`Scheme`
and decorates it with :func:`register_scheme`; everything else asks the registry (``kdray list schemes``
prints it). A scheme names its config ``sections`` (a section of another scheme given in a config is an
error), ``check`` s a config, ``plan`` s its stages, runs the stage kinds the generic training does not
(``run_stage``), and may ``finish`` a job after its stages (born-again's generation ensemble).

This package imports nothing heavy at module level (``kdray.config`` validates through it): the built-in
schemes import the job's machinery inside their methods.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from kdray.config import Config

_REGISTRY: dict[str, "Scheme"] = {}


class Scheme:
    """A scheme: its ``name``, a one-line ``help`` for ``kdray list schemes``, and the config ``sections``
    only it reads. Subclasses override :meth:`plan` and, where they need to, the other hooks."""

    name: str = ""
    help: str = ""
    sections: tuple[str, ...] = ()

    def check(self, cfg: "Config") -> None:
        """Raise ``ValueError`` with one line when the config lacks what the scheme needs (run inside config
        validation, so the line reaches the user as a :class:`~kdray.config.ConfigError`). May complete
        scheme defaults in ``cfg.__dict__`` (online peers default to no methods)."""

    def plan(self, cfg: "Config") -> list[dict]:
        """The ordered stages of a job; each becomes one MLflow child run (see ``kdray.orchestrator.job``)."""
        raise NotImplementedError

    def models(self, cfg: "Config") -> list[tuple[str, Any]]:
        """The models it trains besides the student and the teachers, by config path (``assistants.0``):
        preflight builds each and checks it outputs the dataset's classes."""
        return []

    def run_stage(self, cfg: "Config", stage: dict, splits, ctx, job_state: dict, resume_loop: dict | None) -> dict:
        """Train one stage; the default is the generic single-model training of ``job.train_stage``."""
        from kdray.orchestrator.job import train_stage

        return train_stage(cfg, stage, splits, ctx, job_state, resume_loop)

    def finish_inputs(self, cfg: "Config", stages: list[dict]) -> list[str]:
        """The stages whose result rows and kept weights :meth:`finish` reads; none = no finish step."""
        return []

    def finish(self, cfg: "Config", stages: list[dict], splits, ctx, job_state: dict) -> None:
        """After every stage ran: add job-level results to ``job_state["done"]`` rows."""

    def preflight(self, cfg: "Config", splits, example, student, teachers: list, orders: list) -> None:
        """Checks needing data and built models but no training (feature points resolve, shapes agree):
        ``teachers`` are the built models of ``cfg.teacher_specs()``, ``orders`` their class orders."""


def register_scheme(cls: type[Scheme]) -> type[Scheme]:
    """Class decorator: register one instance of a :class:`Scheme` subclass under its ``name``."""
    if not cls.name or not cls.help:
        raise ValueError(f"scheme {cls.__name__} needs a name and a one-line help")
    if cls.name in _REGISTRY and type(_REGISTRY[cls.name]) is not cls:
        raise ValueError(f"scheme {cls.name!r} is already registered by {type(_REGISTRY[cls.name]).__name__}")
    _REGISTRY[cls.name] = cls()
    return cls


def unregister_scheme(name: str) -> None:
    """Remove a scheme (tests register throw-away schemes)."""
    _REGISTRY.pop(name, None)


def list_schemes() -> dict[str, Scheme]:
    """Every registered scheme by name, built-ins first in their documented order."""
    return dict(_REGISTRY)


def get_scheme(name: str) -> Scheme:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(unknown_scheme_message())
    return _REGISTRY[name]


def unknown_scheme_message() -> str:
    """Pydantic's own words for a Literal, as the ``scheme:`` field said before it became a registry."""
    names = [repr(n) for n in _REGISTRY]
    return f"Input should be {' or '.join([', '.join(names[:-1]), names[-1]] if len(names) > 1 else names)}"


def section_owners() -> dict[str, list[str]]:
    """Config section -> the schemes that read it."""
    owners: dict[str, list[str]] = {}
    for scheme in _REGISTRY.values():
        for section in scheme.sections:
            owners.setdefault(section, []).append(scheme.name)
    return owners


@dataclass(frozen=True)
class TeacherSource:
    """Where a stage's teacher comes from: ``stage`` = the weights of an earlier stage of the job (``ref`` its
    name), ``spec`` = a teacher given by checkpoint / MLflow URI / cache (``ref`` its config path). Stage rows
    hold it as its string ``kind:ref``: rows go into checkpoints read with ``weights_only`` and into MLflow."""

    kind: Literal["stage", "spec"]
    ref: str

    @classmethod
    def parse(cls, text: str) -> "TeacherSource":
        kind, sep, ref = text.partition(":")
        if not sep or kind not in ("stage", "spec") or not ref:
            raise ValueError(f"teacher source {text!r} is neither stage:<name> nor spec:<config path>")
        return cls(kind, ref)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"{self.kind}:{self.ref}"


def from_stage(name: str) -> str:
    """The teacher source of the weights stage ``name`` trains."""
    return str(TeacherSource("stage", name))


def stage_teachers(row: dict) -> list[str]:
    """The names of the stages whose weights teach this stage (the ones it must wait for)."""
    sources = [TeacherSource.parse(text) for text in row.get("teachers", [])]
    return [src.ref for src in sources if src.kind == "stage"]


def stage(name: str, kind: str, seed: int, spec: str, model: str, teachers: list[str] | None = None,
          **extra) -> dict:
    """A stage row: ``spec`` is the config path of its model (``student``, ``teachers.1``, ...), ``teachers``
    its teacher sources (``stage:<name>`` = weights trained earlier in the job, ``spec:<path>`` = a
    teacher given by checkpoint / MLflow URI)."""
    row = {"name": name, "kind": kind, "seed": seed, "spec": spec, "model": model, **extra}
    if teachers:
        row["teachers"] = teachers
    return row


def method_label(cfg: "Config") -> str:
    return "+".join(m.name for m in cfg.methods)


def teacher_sources(cfg: "Config", stages: list[dict]) -> list[str]:
    """Train the configured teachers that need training (as stages appended to ``stages``), and name every
    teacher's source."""
    sources = []
    paths = cfg.teacher_paths()
    for i, (path, spec) in enumerate(paths):
        name = f"teacher-{i}" if len(paths) > 1 else "teacher"
        if spec.train is not None:
            stages.append(stage(name, "teacher", cfg.seeds[0], path, spec.model, keep=True))
            sources.append(from_stage(name))
        else:
            sources.append(str(TeacherSource("spec", path)))
    return sources


def taught_students(cfg: "Config", stages: list[dict], sources: list[str]) -> list[dict]:
    """Per seed: the student from scratch (``baseline``) and the student taught by ``sources``."""
    for seed in cfg.seeds:
        if cfg.baseline:
            stages.append(stage(f"scratch-seed{seed}", "scratch", seed, "student", cfg.student.model))
        stages.append(stage(f"{method_label(cfg)}-seed{seed}", "distill", seed, "student", cfg.student.model,
                            sources, methods=method_label(cfg)))
    return stages


def needs_methods(cfg: "Config") -> None:
    if not cfg.methods:
        raise ValueError(f"scheme {cfg.scheme!r} needs at least one method (methods: [{{name: kd}}]; "
                         f"see `kdray list methods`)")


def needs_teacher(cfg: "Config") -> None:
    if cfg.teacher is None:
        raise ValueError(f"scheme {cfg.scheme!r} needs a teacher (teacher: {{model, train|checkpoint|mlflow_uri}})")


def no_teacher(cfg: "Config") -> None:
    if cfg.teacher is not None or cfg.teachers:
        raise ValueError(f"scheme {cfg.scheme!r} trains without a pre-trained teacher; remove teacher/teachers")


def distill_preflight(cfg: "Config", splits, example, student, teacher_model, order) -> None:
    """One teacher and the student: the methods' feature points resolve and their connectors build."""
    from kdray.algorithms.base import create_method
    from kdray.algorithms.distiller import Distiller, Teacher

    distiller = Distiller(student, [create_method(m.name, **m.params()) for m in cfg.methods], cfg.ce_weight)
    distiller.build(example, Teacher(teacher_model, distiller.resolve_teacher_points(teacher_model), order),
                    len(splits.train))


def _builtins() -> None:
    # Registration order is the order of `kdray list schemes` and of the scheme error message.
    from kdray.orchestrator.schemes import offline, online, self_distill, assistant, multi_teacher  # noqa: F401


_builtins()
