"""The plan of a job: the scheme registry, and the typed stages a scheme plans (who teaches whom).

Why: a scheme used to be spread over the config checks, the stage planner, the stage dispatch, the job's
post-step, the preflight and the stage graph. Now a scheme is one module that subclasses :class:`Scheme`
and decorates it with :func:`register_scheme`; everything else asks the registry (``kdray list schemes``
prints it). A scheme names its config ``sections`` (a section of another scheme given in a config is an
error), ``check`` s a config, ``plan`` s its :class:`Stage` s, runs the stage kinds the generic training does
not (``own_stage_kinds`` / ``run_stage``), and may ``finish`` a job after its stages (born-again's ensemble).

This module sits below everything that builds or runs (``kdray.config`` validates through it), so it imports
no runner: the built-in schemes (modules under ``kdray/orchestrator/schemes/``) and third-party ones (entry
point group ``kdray.schemes``) are imported by name on the registry's first use, as plug-ins are.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from kdray.config import Config

# Registration order is the order of `kdray list schemes` and of the scheme error message.
BUILTIN_SCHEMES = ("offline", "online", "self_distill", "assistant", "multi_teacher", "adversarial",
                   "data_free", "deep_inversion", "quantized", "graph", "lifelong", "cross_modal", "rco", "lm")
ENTRY_POINT_GROUP = "kdray.schemes"

_REGISTRY: dict[str, "Scheme"] = {}
_LOADED = False


def load_schemes() -> None:
    """Import the built-in scheme modules, then every installed plug-in (entry point group ``kdray.schemes``),
    once per process."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for module in BUILTIN_SCHEMES:
        importlib.import_module(f"kdray.orchestrator.schemes.{module}")
    load_plugin_schemes(entry_points(group=ENTRY_POINT_GROUP))


def load_plugin_schemes(points) -> None:
    """Load scheme plug-ins from entry points: each names a module (whose ``@register_scheme`` registers it)
    or a :class:`Scheme` subclass (registered here)."""
    for point in points:
        loaded = point.load()
        if isinstance(loaded, type) and issubclass(loaded, Scheme) and loaded.name not in _REGISTRY:
            register_scheme(loaded)


class Scheme:
    """A scheme: its ``name``, a one-line ``help`` for ``kdray list schemes``, and the config ``sections``
    only it reads. Subclasses override :meth:`plan` and, where they need to, the other hooks."""

    name: str = ""
    help: str = ""
    sections: tuple[str, ...] = ()

    # What ``kdray sweep`` optimises: the val_top1 of this stage kind's students (one per seed), taught by the
    # one ``teacher:`` the sweep trains once; ``None``: the scheme cannot be swept. ``search_settings``: config
    # values every trial takes (baselines a trial need not train), by section.
    searched_kind: str | None = None
    search_settings: dict[str, dict] = {}

    def searched_kind_for(self, cfg: "Config") -> str | None:
        """The stage kind a sweep of ``cfg`` scores (a scheme whose kinds depend on the config overrides it)."""
        return self.searched_kind

    def check(self, cfg: "Config") -> None:
        """Raise ``ValueError`` with one line when the config lacks what the scheme needs (run inside config
        validation, so the line reaches the user as a :class:`~kdray.config.ConfigError`). May complete
        scheme defaults in ``cfg.__dict__`` (online peers default to no methods)."""

    def plan(self, cfg: "Config") -> list["Stage"]:
        """The ordered stages of a job; each becomes one MLflow child run (see ``kdray.orchestrator.job``)."""
        raise NotImplementedError

    def models(self, cfg: "Config") -> list[tuple[str, Any]]:
        """The models it trains besides the student and the teachers, by config path (``assistants.0``):
        preflight builds each and checks it outputs the dataset's classes."""
        return []

    # Stage kinds this scheme trains itself (online: the peer cohort); every other kind is the generic
    # single-model training of the offline runner (kdray/orchestrator/job.py ``train_stage``).
    own_stage_kinds: tuple[str, ...] = ()

    def run_stage(self, cfg: "Config", stage: "Stage", splits, ctx, job_state: dict,
                  resume_loop: dict | None) -> dict:
        """Train one stage of a kind in ``own_stage_kinds``; return its result row."""
        raise NotImplementedError(f"scheme {self.name!r} lists {stage.kind!r} in own_stage_kinds but has no run_stage")

    def finish_inputs(self, cfg: "Config", stages: list["Stage"]) -> list[str]:
        """The stages whose result rows and kept weights :meth:`finish` reads; none = no finish step."""
        return []

    def finish(self, cfg: "Config", stages: list["Stage"], splits, ctx, job_state: dict) -> None:
        """After every stage ran: add job-level results to ``job_state.done`` rows (a
        :class:`~kdray.orchestrator.run_dir.JobState`)."""

    def job_figures(self, cfg: "Config", rows: list[dict]) -> dict:
        """Figures of the whole job's result rows for its MLflow run, by artifact name (``graph``: top-1 by
        node structure); default none."""
        return {}

    def check_data(self, cfg: "Config", splits) -> None:
        """Checks of the data alone, before any model is built or run on it (a dataset of the wrong kind for
        the scheme): raise ``ValueError`` with one line."""

    def model_inputs(self, cfg: "Config", path: str, inputs):
        """What the model at config path ``path`` (``teacher``, ``teachers.1``, ``student``, ...) reads of a
        batch's ``inputs`` (preflight calls it before running a model on the example batch); default: all of
        them. A scheme on a dataset of several modalities picks that model's one (``cross_modal``)."""
        return inputs

    def preflight(self, cfg: "Config", splits, example, student, teachers: list, orders: list) -> None:
        """Checks needing data and built models but no training (feature points resolve, shapes agree):
        ``teachers`` are the built models of ``cfg.teacher_specs()``, ``orders`` their class orders."""


def register_scheme(cls: type[Scheme]) -> type[Scheme]:
    """Class decorator: register one instance of a :class:`Scheme` subclass under its ``name`` (after the
    built-ins, so they keep their places in the listing)."""
    load_schemes()
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
    load_schemes()
    return dict(_REGISTRY)


def get_scheme(name: str) -> Scheme:
    load_schemes()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(unknown_scheme_message())
    return _REGISTRY[name]


def searched_stages(cfg: "Config") -> list[Stage]:
    """The stages a sweep's objective reads (its scheme's ``searched_kind``), in plan order."""
    kind = get_scheme(cfg.scheme).searched_kind_for(cfg)
    return [s for s in plan_stages(cfg) if s.kind == kind]


def unknown_scheme_message() -> str:
    """Pydantic's own words for a Literal, as the ``scheme:`` field said before it became a registry."""
    load_schemes()
    names = [repr(n) for n in _REGISTRY]
    return f"Input should be {' or '.join([', '.join(names[:-1]), names[-1]] if len(names) > 1 else names)}"


def section_owners() -> dict[str, list[str]]:
    """Config section -> the schemes that read it."""
    load_schemes()
    owners: dict[str, list[str]] = {}
    for scheme in _REGISTRY.values():
        for section in scheme.sections:
            owners.setdefault(section, []).append(scheme.name)
    return owners


@dataclass(frozen=True)
class TeacherSource:
    """Where a stage's teacher comes from: ``stage`` = the weights of an earlier stage of the job (``ref`` its
    name), ``spec`` = a teacher given by checkpoint / MLflow URI / cache (``ref`` its config path). Result rows
    hold it as its string ``kind:ref``: rows go into checkpoints read with ``weights_only`` and into MLflow."""

    kind: Literal["stage", "spec"]
    ref: str

    @classmethod
    def parse(cls, text: "str | TeacherSource") -> "TeacherSource":
        if isinstance(text, TeacherSource):
            return text
        kind, sep, ref = text.partition(":")
        if not sep or kind not in ("stage", "spec") or not ref:
            raise ValueError(f"teacher source {text!r} is neither stage:<name> nor spec:<config path>")
        return cls(kind, ref)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"{self.kind}:{self.ref}"


@dataclass(frozen=True)
class Stage:
    """One planned stage of a job: one model trained, one MLflow child run. ``spec`` is the config path of its
    model (``student``, ``teachers.1``, ``assistants.0``, ``online.peers``), ``teachers`` where its teachers
    come from; ``keep`` = its weights stay in the job state (a later stage or the finish step reads them);
    ``generation`` numbers born-again generations, ``peers`` names an online cohort's models, ``methods`` the
    knowledge terms it is taught with."""

    name: str
    kind: str
    seed: int
    spec: str
    model: str
    teachers: tuple[TeacherSource, ...] = ()
    keep: bool = False
    generation: int | None = None
    peers: tuple[str, ...] | None = None
    methods: str | None = None
    # Where and when it ran (a stage task adds its Ray task, node, pid, start): copied into its result row.
    run_facts: dict = field(default_factory=dict, compare=False)

    def stage_teachers(self) -> list[str]:
        """The names of the stages whose weights teach this stage (the ones it must wait for)."""
        return [src.ref for src in self.teachers if src.kind == "stage"]

    def taught_by_spec(self, path: str) -> bool:
        """Whether its one teacher is the pre-trained one at config path ``path``."""
        return self.teachers == (TeacherSource("spec", path),)

    def row(self) -> dict:
        """The stage as plain values (its result row starts from it): only the fields it sets, teachers as
        ``kind:ref`` strings, so rows load with ``weights_only`` and log to MLflow as they always did."""
        row = {"name": self.name, "kind": self.kind, "seed": self.seed, "spec": self.spec, "model": self.model}
        if self.keep:
            row["keep"] = True
        for key in ("generation", "methods"):
            if getattr(self, key) is not None:
                row[key] = getattr(self, key)
        if self.peers is not None:
            row["peers"] = list(self.peers)
        if self.teachers:
            row["teachers"] = [str(t) for t in self.teachers]
        return {**row, **self.run_facts}


def from_stage(name: str) -> TeacherSource:
    """The teacher source of the weights stage ``name`` trains."""
    return TeacherSource("stage", name)


def stage(name: str, kind: str, seed: int, spec: str, model: str,
          teachers: "list[str | TeacherSource] | None" = None, **extra) -> Stage:
    """A :class:`Stage`; ``teachers`` may be given as ``stage:<name>`` / ``spec:<path>`` strings."""
    if "peers" in extra:
        extra["peers"] = tuple(extra["peers"])
    return Stage(name, kind, seed, spec, model, tuple(TeacherSource.parse(t) for t in teachers or ()), **extra)


def plan_stages(cfg: "Config") -> list[Stage]:
    """The ordered stages of a job, planned by its scheme; each becomes one MLflow child run."""
    return get_scheme(cfg.scheme).plan(cfg)


def model_spec(cfg: "Config", path: str):
    """The ModelSpec at a config path such as ``student``, ``teacher``, ``teachers.1``, ``assistants.0``."""
    node = cfg
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def stage_spec_path(cfg: "Config", source: TeacherSource) -> str:
    """The config path of the model behind a teacher source (an earlier stage's model, or the spec itself).
    ``<stage>@epoch<N>``, weights a stage kept during its training (RCO's anchors), is that stage's model."""
    if source.kind == "spec":
        return source.ref
    return {s.name: s.spec for s in plan_stages(cfg)}[source.ref.partition("@")[0]]


def method_label(cfg: "Config") -> str:
    return "+".join(m.name for m in cfg.methods)


def teacher_sources(cfg: "Config", stages: list[Stage]) -> list[TeacherSource]:
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
            sources.append(TeacherSource("spec", path))
    return sources


@dataclass(frozen=True)
class SeedStage:
    """A stage each seed adds before the taught student: its name before ``-seed<N>``, its kind, and whether
    it reads the teacher sources (a noise-input student does; a from-scratch one does not)."""

    name: str
    kind: str
    taught: bool = False


def scratch_baseline(cfg: "Config") -> list[SeedStage]:
    """The student from scratch, when ``cfg.baseline`` asks for it: every scheme's default baseline."""
    return [SeedStage("scratch", "scratch")] if cfg.baseline else []


def taught_students(cfg: "Config", stages: list[Stage], sources: list[TeacherSource], *, kind: str = "distill",
                    name: str | None = None, methods: str | None = None,
                    baselines: list[SeedStage] | None = None) -> list[Stage]:
    """Per seed: the ``baselines`` (default :func:`scratch_baseline`), then the student taught by ``sources``
    as a stage of ``kind`` named ``<name>-seed<N>`` (``name`` and ``methods`` default to the methods' label).

    Every teacher-student scheme plans this same "per seed, baselines then the taught student" shape; only the
    kinds and names differ, so they are arguments rather than one copy per scheme."""
    label = method_label(cfg)
    methods = label if methods is None else methods
    name = methods if name is None else name
    baselines = scratch_baseline(cfg) if baselines is None else baselines
    for seed in cfg.seeds:
        for extra in baselines:
            if extra.taught:
                stages.append(stage(f"{extra.name}-seed{seed}", extra.kind, seed, "student", cfg.student.model,
                                    sources, methods=methods))
            else:
                stages.append(stage(f"{extra.name}-seed{seed}", extra.kind, seed, "student", cfg.student.model))
        stages.append(stage(f"{name}-seed{seed}", kind, seed, "student", cfg.student.model, sources,
                            methods=methods))
    return stages


def needs_methods(cfg: "Config") -> None:
    if not cfg.methods:
        raise ValueError(f"scheme {cfg.scheme!r} needs at least one method (methods: [{{name: kd}}]; "
                         f"see `kdray list methods`)")


def needs_teacher(cfg: "Config") -> None:
    if cfg.teacher is None:
        raise ValueError(f"scheme {cfg.scheme!r} needs a teacher (teacher: {{model, train|checkpoint|mlflow_uri}})")


def methods_need_teacher(cfg: "Config") -> bool:
    """Whether any of ``methods:`` reads a teacher (``KnowledgeTerm.needs_teacher``): a student taught only by
    self-distilling terms (CS-KD, mean teacher) is planned and trained without one."""
    from kdray.algorithms.base import get_method

    return any(get_method(m.name).needs_teacher for m in cfg.methods)


def no_cache_with_views(cfg: "Config") -> None:
    """A method that runs the teacher on extra views of each batch (SSKD's rotations) cannot read a cache."""
    from kdray.algorithms.base import KnowledgeTerm, get_method

    views = [m.name for m in cfg.methods if get_method(m.name).extra_inputs is not KnowledgeTerm.extra_inputs
             and get_method(m.name).teacher_sees_views]
    if views and cfg.teacher is not None and cfg.teacher.cache is not None:
        raise ValueError(f"method {views[0]!r} runs the teacher on extra views of each batch; a teacher cache holds "
                         f"only its outputs on the training inputs: drop teacher.cache")


def needs_live_teacher(cfg: "Config", use: str) -> None:
    """The scheme runs the teacher on inputs of its own making (``use`` says on what): a teacher cache, which
    holds only the teacher's outputs on the training set, cannot serve it."""
    needs_teacher(cfg)
    if cfg.teacher.cache is not None:
        raise ValueError(f"scheme {cfg.scheme!r} runs the teacher on {use}; a teacher cache holds only its outputs "
                         f"on the training set: give teacher.train, checkpoint or mlflow_uri")


def no_teacher(cfg: "Config") -> None:
    if cfg.teacher is not None or cfg.teachers:
        raise ValueError(f"scheme {cfg.scheme!r} trains without a pre-trained teacher; remove teacher/teachers")


def matched_steps(cfg, paired: int, labelled: int):
    """``cfg`` with ``train.epochs`` (and checkpoint interval, step milestones) scaled so that a student on
    ``labelled`` samples takes as many optimizer steps as the taught one on ``paired`` samples: the baseline is
    not cut short by its smaller epochs (``ceil(n / batch_size)`` steps an epoch each): cross-modal's labelled-only
    student, and the label-only student of a dataset with a transfer set."""
    batch = cfg.train.batch_size
    ratio = math.ceil(paired / batch) / math.ceil(labelled / batch)
    if ratio <= 1:
        return cfg
    train = cfg.train.model_copy(update={"epochs": int(round(cfg.train.epochs * ratio)),
                                         "milestones": [int(round(m * ratio)) for m in cfg.train.milestones]})
    every = cfg.checkpoint.model_copy(update={"every_epochs": int(round(cfg.checkpoint.every_epochs * ratio))})
    return cfg.model_copy(update={"train": train, "checkpoint": every})
