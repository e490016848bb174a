"""Config -> objects: the one place a job's config becomes data, models, knowledge terms, distillers,
teachers and optimizers.

Why one module: the driver's preflight, every stage runner (offline, online, self), the teacher cache and
a sweep's build checks all turn the same config into the same objects; doing it here once means they
cannot drift apart (they had: five copies, each slightly different). Placement (DDP, shards, loaders) is
:mod:`kdray.orchestrator.placement`; what a stage *does* with the objects is its runner's business.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from kdray.algorithms.base import KnowledgeTerm, create_method
from kdray.algorithms.distiller import ClassOrderError, Distiller, Teacher, class_order
from kdray.algorithms.engine import seed_everything
from kdray.algorithms.optim import make_optimizer, make_schedule
from kdray.algorithms.schemes.byot import BYOTDistiller
from kdray.algorithms.schemes.multi_teacher import TeacherEnsemble
from kdray.config import Config, ConfigError
from kdray.data import build_datasets
from kdray.data.collate import collate_batch
from kdray.models import create_model
from kdray.orchestrator.cache_store import open_cache_for_run
from kdray.orchestrator.placement import ShardedTeacherEnsemble, WorkerContext
from kdray.orchestrator.plan import Stage, TeacherSource, methods_need_teacher, model_spec, stage_spec_path
from kdray.orchestrator.text_tokens import tokenized_options
from kdray.orchestrator.weights import load_weights, read_weights


def build_splits(cfg: Config):
    """The job's dataset splits, as every worker, task and check builds them."""
    options = tokenized_options(cfg.data.name, cfg.data.builder_options(), cfg.data.root, cfg.run_dir(),
                                cfg.ray.address)  # tokenize_with: ray tokenises a text corpus once, on Ray Data
    return build_datasets(cfg.data.name, root=cfg.data.root, **options)


def example_batch(dataset, count: int = 2) -> torch.Tensor | dict[str, torch.Tensor]:
    """The first ``count`` inputs of ``dataset`` stacked: what lazy connectors are built against. Inputs that
    are a mapping (a cross-modal dataset's modalities, a text sample's token ids and mask) are stacked per key,
    variable-length ones padded as the loaders' :func:`~kdray.data.collate.collate_batch` pads them."""
    inputs = [dataset[i][0] for i in range(min(count, len(dataset)))]
    if inputs and isinstance(inputs[0], Mapping):
        return collate_batch([(x, 0, 0) for x in inputs])[0]
    return torch.stack(inputs)


def build_terms(cfg: Config) -> list[KnowledgeTerm]:
    """The knowledge terms of ``methods:``, fresh instances each call."""
    return [create_method(m.name, **m.params()) for m in cfg.methods]


def build_distiller(cfg: Config, model: nn.Module, stage: Stage | None = None, num_teachers: int = 1) -> Distiller:
    """The trainable module of a stage: BYOT's self-distiller, a distiller with the config's terms (a taught
    stage), or the plain cross-entropy wrapper (teacher, scratch)."""
    if stage is not None and stage.kind == "byot":
        return BYOTDistiller(model)
    taught = stage is None or bool(stage.teachers) or (stage.kind == "distill" and not methods_need_teacher(cfg))
    return Distiller(model, build_terms(cfg) if taught else [], cfg.ce_weight if taught else 1.0,
                     num_teachers=num_teachers)


def wants_class_pairs(cfg: Config, distiller: Distiller) -> bool:
    """Whether a stage's training batches are class pairs: ``data.class_pairs``, or a term reading them (CS-KD)."""
    return cfg.data.class_pairs or any(t.needs_class_pairs for t in getattr(distiller, "terms", []))


def build_optimizer(params, optim) -> tuple:
    """``(optimizer, scheduler)`` from a training section (``train:`` or a teacher's ``train:``)."""
    optimizer = make_optimizer(list(params), optim.optimizer, optim.lr, optim.weight_decay, optim.momentum,
                               optim.dot_delta)
    return optimizer, make_schedule(optimizer, optim.schedule, optim.epochs, optim.milestones, optim.gamma)


def worker_cpus(cfg: Config) -> int | None:
    """The CPUs one worker may use for data loading: ``ray.cpus_per_worker`` on Ray, the machine's in-process."""
    return int(cfg.ray.cpus_per_worker) if cfg.ray.num_workers > 0 else None


def build_peers(cfg: Config, seed: int, num_classes: int) -> list[nn.Module]:
    """Online peers; peer k is initialised from seed ``1000 * seed + k``, wherever it is built (so placements
    agree)."""
    peers = []
    for k, spec in enumerate(cfg.online.peers):
        seed_everything(1000 * seed + k)
        peers.append(create_model(spec.model, num_classes, **spec.args))
    return peers


def create_spec_model(spec, key: str, num_classes: int) -> nn.Module:
    """``create_model`` for the ModelSpec at config path ``key``; a model constructor that rejects the config's
    args (``Trying to create tensor with negative dimension -4``) is a one-line :class:`ConfigError` naming the
    arg: the one whose removal lets the model build (found by building it once without each), else ``key.args``."""
    try:
        return create_model(spec.model, num_classes, **spec.args)
    except (ValueError, TypeError, RuntimeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        for name in spec.args:
            try:
                create_model(spec.model, num_classes, **{k: v for k, v in spec.args.items() if k != name})
            except (ValueError, TypeError, RuntimeError):
                continue
            raise ConfigError(f"{key}.args.{name}={spec.args[name]!r}: {spec.model} cannot be built with it "
                              f"({reason}); give a valid value or remove it for the default") from None
        raise ConfigError(f"{key}.args: {spec.model} cannot be built with {dict(spec.args)} ({reason})") from None


def build_teacher_model(cfg: Config, source: TeacherSource | str, num_classes: int, weights: dict[str, dict],
                        tracking_uri: str | None) -> nn.Module:
    """The frozen model behind a teacher source: weights from an earlier stage, a checkpoint or MLflow."""
    parsed = TeacherSource.parse(source)
    kind, ref = parsed.kind, parsed.ref
    if kind == "stage":
        if ref not in weights:
            raise RuntimeError(f"stage {ref!r} has not run yet")
        spec = model_spec(cfg, stage_spec_path(cfg, parsed))
        model = create_model(spec.model, num_classes, **spec.args)
        return load_weights(model, weights[ref], f"stage {ref}", num_classes)
    spec = model_spec(cfg, ref)
    model = create_spec_model(spec, ref, num_classes)
    if getattr(spec, "pretrained", False):  # the builder loaded its weights (a local pretrained directory)
        return model
    if spec.checkpoint is not None:
        state = read_weights(spec.checkpoint, f"{ref}.checkpoint")
        return load_weights(model, state, f"{ref}.checkpoint {spec.checkpoint}", num_classes)
    from kdray.orchestrator.tracking import download_model  # MLflow loads only for an MLflow-logged teacher

    logged_spec, state = download_model(spec.mlflow_uri, tracking_uri)
    if logged_spec.get("model") != spec.model:
        raise ConfigError(f"{ref}.mlflow_uri holds a {logged_spec.get('model')!r}, config says {spec.model!r}")
    return load_weights(model, state, f"{ref}.mlflow_uri {spec.mlflow_uri}", num_classes)


def teacher_class_order(cfg: Config, source: TeacherSource | str, classes: list[str]) -> list[int] | None:
    """How a teacher's logits are reordered into the dataset's class order (from its spec's ``classes``);
    a teacher whose classes are not the dataset's is a one-line :class:`ConfigError` naming it."""
    path = stage_spec_path(cfg, TeacherSource.parse(source))
    declared = getattr(model_spec(cfg, path), "classes", None)
    if declared is None:
        return None
    try:
        return class_order(declared, classes)
    except ClassOrderError as err:
        shown = ", ".join(classes[:12]) + (", ..." if len(classes) > 12 else "")
        raise ConfigError(f"{path}.classes: {err} compared with dataset {cfg.data.name!r} ({len(classes)} classes: "
                          f"{shown}); list the teacher's outputs in its order using the dataset's class names, "
                          f"or remove classes if it uses the dataset's order") from None


def build_teacher(cfg: Config, stage: Stage, distiller: Distiller, num_classes: int, weights: dict,
                  ctx: WorkerContext, classes: list[str] | None = None):
    """One :class:`Teacher`, or a :class:`TeacherEnsemble` of several (sharded across workers if asked).

    Each teacher's logits are put into the dataset's class order (``classes``) when its spec declares
    another order. With several teachers the distiller's feature / relation terms get one copy (one
    connector) per teacher, resolved against that teacher's own architecture."""
    classes = list(classes or [str(i) for i in range(num_classes)])
    sources = stage.teachers
    orders = [teacher_class_order(cfg, src, classes) for src in sources]
    models = [build_teacher_model(cfg, src, num_classes, weights, ctx.tracking_uri) for src in sources]
    if len(models) == 1:
        return Teacher(models[0], distiller.resolve_teacher_points(models[0]), orders[0])
    distiller.set_num_teachers(len(models))
    teachers = [Teacher(m, distiller.resolve_teacher_points(m, member=i), orders[i]) for i, m in enumerate(models)]
    if ctx.world_size > 1 and cfg.ensemble.shard:
        return ShardedTeacherEnsemble(teachers, ctx.rank, ctx.world_size, cfg.ensemble.combine,
                                      cfg.ensemble.weights, seed=stage.seed)
    return TeacherEnsemble(teachers, cfg.ensemble.combine, cfg.ensemble.weights, seed=stage.seed)


def build_stage_teacher(cfg: Config, stage: Stage, distiller: Distiller, splits, weights: dict, ctx: WorkerContext):
    """What teaches a stage: ``None`` (untaught), the teacher cache's outputs by sample index (no teacher built),
    or the live teacher(s) of :func:`build_teacher`."""
    if not stage.teachers:
        return None
    if stage.taught_by_spec("teacher") and cfg.teacher.cache is not None:
        return open_cache_for_run(cfg, splits, distiller, ctx.tracking_uri, ctx.rank, ctx.world_size)
    return build_teacher(cfg, stage, distiller, splits.num_classes, weights, ctx, classes=splits.classes)


def check_distiller_builds(cfg: Config, example, student: nn.Module, teachers: list[nn.Module], orders: list,
                           num_samples: int) -> None:
    """Preflight: the methods' feature points resolve against each teacher and their connectors build
    (one connector per teacher with several)."""
    distiller = build_distiller(cfg, student, num_teachers=max(len(teachers), 1))
    if not teachers:  # self-distilling methods only (cs_kd, mean_teacher)
        teacher = None
    elif len(teachers) == 1:
        teacher = Teacher(teachers[0], distiller.resolve_teacher_points(teachers[0]), orders[0])
    else:
        teacher = TeacherEnsemble([Teacher(m, distiller.resolve_teacher_points(m, member=i), orders[i])
                                   for i, m in enumerate(teachers)], cfg.ensemble.combine, cfg.ensemble.weights)
    distiller.build(example, teacher, num_samples)  # memory banks are sized by the training set
