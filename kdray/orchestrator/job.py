"""One distillation job, run by every worker: the teacher stage, then each seed's students.

The same function runs in-process (``ray.num_workers: 0``) and inside each Ray Train worker; what
differs is supplied in a :class:`WorkerContext` (rank, device, where checkpoints go, how the trainable
module is wrapped). All stages of a job run in one Ray Train run, so several seeds cost one start-up.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from kdray.algorithms.base import create_method
from kdray.algorithms.distiller import Distiller, Teacher
from kdray.algorithms.engine import TrainLoop, evaluate, seed_everything
from kdray.algorithms.optim import make_optimizer, make_schedule
from kdray.config import Config, ConfigError
from kdray.data import build_datasets
from kdray.orchestrator.callbacks import Checkpointer, Progress, WithStage
from kdray.models import create_model


@dataclass
class WorkerContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    checkpoints: object = None  # LocalCheckpoints | RayCheckpoints
    wrap: Callable[[nn.Module], nn.Module] = lambda m: m
    tracking_uri: str | None = None
    stage_run_ids: dict[str, str] = field(default_factory=dict)
    log: Callable[[str], None] = print
    # Extra epoch-end callbacks (e.g. a Tune reporter); each gets (epoch, metrics, loop) with
    # ``metrics["stage"]`` added.
    callbacks: list = field(default_factory=list)


def method_label(cfg: Config) -> str:
    from kdray.orchestrator.schemes import method_label as label

    return label(cfg)


def plan_stages(cfg: Config) -> list[dict]:
    """The ordered stages of a job, planned by its scheme (kdray/orchestrator/schemes); each becomes one MLflow
    child run. A stage row names its model's config path (``spec``) and its teacher sources (``teachers``)."""
    from kdray.orchestrator.schemes import get_scheme

    return get_scheme(cfg.scheme).plan(cfg)


def model_spec(cfg: Config, path: str):
    """The ModelSpec at a config path such as ``student``, ``teacher``, ``teachers.1``, ``assistants.0``."""
    node = cfg
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def unwrap_state(state: dict) -> dict:
    """RepDistiller / mdistiller save ``{"model": state_dict, ...}``; accept those and plain state_dicts."""
    for key in ("model", "state_dict", "student"):
        if key in state and isinstance(state[key], dict):
            return state[key]
    return state


def load_weights(model: nn.Module, state: dict, source: str, num_classes: int) -> nn.Module:
    """Load ``state`` into ``model``; a class-count or architecture mismatch is a one-line error."""
    state = unwrap_state(state)
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise ConfigError(
                f"{source}: parameter {key!r} has shape {tuple(value.shape)} but the model expects "
                f"{tuple(own[key].shape)} (dataset has {num_classes} classes; is it the same architecture "
                f"and class count?)"
            )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{source}: does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def read_weights(path: str, what: str) -> dict:
    """A state_dict from a file, read with ``torch.load(weights_only=True)``: tensors and plain containers only,
    never pickled code (a checkpoint that holds objects is refused, not unpickled). A file that cannot be read
    is a one-line :class:`ConfigError` naming ``what`` (the config key) and the file."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = next((ln.strip() for ln in str(err).splitlines() if "GLOBAL" in ln), "it holds pickled objects")
        raise ConfigError(f"{what} {path} was refused: it holds pickled objects, not only weights ({detail}); "
                          f"kdray reads only tensors / state_dicts, never pickled code: save the model with "
                          f"torch.save(model.state_dict(), path)") from None
    except (OSError, EOFError, RuntimeError, ValueError) as err:  # cut short, or not a torch file at all
        raise ConfigError(f"{what} {path} is not a readable torch checkpoint (truncated or corrupt: "
                          f"{str(err).splitlines()[0] if str(err) else type(err).__name__}); save it again with "
                          f"torch.save(model.state_dict(), path)") from None


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


def build_teacher_model(cfg: Config, source: str, num_classes: int, weights: dict[str, dict],
                        tracking_uri: str | None) -> nn.Module:
    """The frozen model behind a teacher source: weights from an earlier stage, a checkpoint or MLflow."""
    from kdray.orchestrator.schemes import TeacherSource

    parsed = TeacherSource.parse(source)
    kind, ref = parsed.kind, parsed.ref
    if kind == "stage":
        if ref not in weights:
            raise RuntimeError(f"stage {ref!r} has not run yet")
        spec = model_spec(cfg, {s["name"]: s["spec"] for s in plan_stages(cfg)}[ref])
        model = create_model(spec.model, num_classes, **spec.args)
        return load_weights(model, weights[ref], f"stage {ref}", num_classes)
    spec = model_spec(cfg, ref)
    model = create_spec_model(spec, ref, num_classes)
    if spec.checkpoint is not None:
        state = read_weights(spec.checkpoint, f"{ref}.checkpoint")
        return load_weights(model, state, f"{ref}.checkpoint {spec.checkpoint}", num_classes)
    from kdray.orchestrator.tracking import download_model

    logged_spec, state = download_model(spec.mlflow_uri, tracking_uri)
    if logged_spec.get("model") != spec.model:
        raise ConfigError(f"{ref}.mlflow_uri holds a {logged_spec.get('model')!r}, config says {spec.model!r}")
    return load_weights(model, state, f"{ref}.mlflow_uri {spec.mlflow_uri}", num_classes)


def teacher_class_order(cfg: Config, source: str, classes: list[str]) -> list[int] | None:
    """How a teacher's logits are reordered into the dataset's class order (from its spec's ``classes``);
    a teacher whose classes are not the dataset's is a one-line :class:`ConfigError` naming it."""
    from kdray.algorithms.distiller import ClassOrderError, class_order
    from kdray.orchestrator.schemes import TeacherSource

    parsed = TeacherSource.parse(source)
    kind, ref = parsed.kind, parsed.ref
    path = {s["name"]: s["spec"] for s in plan_stages(cfg)}[ref] if kind == "stage" else ref
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


def build_teacher(cfg: Config, stage: dict, distiller: Distiller, num_classes: int, weights: dict,
                  ctx: "WorkerContext", classes: list[str] | None = None):
    """One :class:`Teacher`, or a :class:`TeacherEnsemble` of several (sharded across workers if asked).

    Each teacher's logits are put into the dataset's class order (``classes``) when its spec declares
    another order. With several teachers the distiller's feature / relation terms get one copy (one
    connector) per teacher, resolved against that teacher's own architecture."""
    from kdray.algorithms.schemes.multi_teacher import TeacherEnsemble

    classes = list(classes or [str(i) for i in range(num_classes)])
    sources = stage["teachers"]
    orders = [teacher_class_order(cfg, src, classes) for src in sources]
    models = [build_teacher_model(cfg, src, num_classes, weights, ctx.tracking_uri) for src in sources]
    if len(models) == 1:
        return Teacher(models[0], distiller.resolve_teacher_points(models[0]), orders[0])
    distiller.set_num_teachers(len(models))
    teachers = [Teacher(m, distiller.resolve_teacher_points(m, member=i), orders[i]) for i, m in enumerate(models)]
    if ctx.world_size > 1 and cfg.ensemble.shard:
        from kdray.orchestrator.placement import ShardedTeacherEnsemble

        return ShardedTeacherEnsemble(teachers, ctx.rank, ctx.world_size, cfg.ensemble.combine,
                                      cfg.ensemble.weights, seed=stage["seed"])
    return TeacherEnsemble(teachers, cfg.ensemble.combine, cfg.ensemble.weights, seed=stage["seed"])


def _shard(dataset, rank: int, world: int):
    return dataset if world == 1 else Subset(dataset, list(range(rank, len(dataset), world)))


def make_loaders(splits, batch_size: int, seed: int, ctx: WorkerContext, loader_workers: int = 0, cache=None):
    """Training batches of ``batch_size // world_size`` per worker (so the global batch is the configured
    one); evaluation on disjoint shards whose counts are summed across ranks (no padding duplicates)."""
    per_worker = max(1, batch_size // ctx.world_size)
    # Shuffling is a function of (seed, epoch) via set_epoch, also with one worker, so a stage resumed
    # at epoch k sees exactly the batches the uninterrupted run saw.
    sampler = DistributedSampler(splits.train, ctx.world_size, ctx.rank, shuffle=True, seed=seed)
    train_set = splits.train
    if cache is not None:  # a teacher cache: batches carry cache row ids (recorded views, this worker's shard)
        from kdray.data.views import cached_train_data

        train_set, sampler = cached_train_data(splits.train, cache, sampler, seed, ctx.world_size)
    kw = {"num_workers": loader_workers, "pin_memory": ctx.device.type == "cuda"}
    train = DataLoader(train_set, batch_size=per_worker, sampler=sampler, drop_last=False, **kw)
    val = DataLoader(_shard(splits.val, ctx.rank, ctx.world_size), batch_size=256, **kw)
    test = DataLoader(_shard(splits.test, ctx.rank, ctx.world_size), batch_size=256, **kw)
    return train, val, test


def run_stage(cfg: Config, stage: dict, splits, ctx: WorkerContext, job_state: dict,
              resume_loop: dict | None) -> dict:
    """Run one stage the way its scheme runs it (most: :func:`train_stage`; online: the peer cohort)."""
    from kdray.orchestrator.schemes import get_scheme

    return get_scheme(cfg.scheme).run_stage(cfg, stage, splits, ctx, job_state, resume_loop)


def train_stage(cfg: Config, stage: dict, splits, ctx: WorkerContext, job_state: dict,
                resume_loop: dict | None) -> dict:
    """Train one model (teacher, student from scratch, or distilled student), record it in ``job_state``
    and checkpoint that; return its result row."""
    kind, seed = stage["kind"], stage["seed"]
    seed_everything(seed)
    spec = model_spec(cfg, stage["spec"])
    optim = spec.train if kind == "teacher" else cfg.train
    model = create_model(spec.model, splits.num_classes, **spec.args)
    taught = bool(stage.get("teachers"))
    terms = [create_method(m.name, **m.params()) for m in cfg.methods] if taught else []
    if kind == "byot":
        from kdray.algorithms.schemes.byot import BYOTDistiller

        distiller = BYOTDistiller(model)
    else:
        distiller = Distiller(model, terms, cfg.ce_weight if taught else 1.0)
    if taught and stage["teachers"] == ["spec:teacher"] and cfg.teacher.cache is not None:
        from kdray.orchestrator.teacher_cache import open_cache_for_run  # outputs by sample index, no teacher built

        teacher = open_cache_for_run(cfg, splits, distiller, ctx.tracking_uri, ctx.rank, ctx.world_size)
    else:
        teacher = (build_teacher(cfg, stage, distiller, splits.num_classes, job_state["weights"], ctx,
                                 classes=splits.classes)
                   if taught else None)
    train_loader, val_loader, test_loader = make_loaders(splits, optim.batch_size, seed, ctx,
                                                         cfg.data.loader_workers,
                                                         teacher if getattr(teacher, "wants_batch", False) else None)
    example = torch.stack([splits.train[i][0] for i in range(min(2, len(splits.train)))])
    distiller.build(example, teacher.bind(range(len(example))) if getattr(teacher, "wants_batch", False) else teacher,
                    len(splits.train))
    distiller.to(ctx.device)
    if teacher is not None:
        teacher.to(ctx.device)
    trainable = ctx.wrap(distiller)
    optimizer = make_optimizer([p for p in trainable.parameters() if p.requires_grad], optim.optimizer, optim.lr,
                               optim.weight_decay, optim.momentum)
    scheduler = make_schedule(optimizer, optim.schedule, optim.epochs, optim.milestones, optim.gamma)
    logger = None
    if ctx.rank == 0 and ctx.tracking_uri and stage["name"] in ctx.stage_run_ids:
        from kdray.orchestrator.tracking import StageLogger

        logger = StageLogger(ctx.tracking_uri, ctx.stage_run_ids[stage["name"]], cfg.mlflow.system_metrics)
    callbacks = [Checkpointer(ctx, job_state, stage["name"], cfg.checkpoint.every_epochs, logger)]
    if ctx.rank == 0:
        callbacks.append(Progress(ctx, stage["name"], optim.epochs))
    callbacks += [WithStage(cb, stage) for cb in ctx.callbacks]
    loop = TrainLoop(trainable, teacher, optimizer, scheduler, train_loader, val_loader, splits.num_classes,
                     optim.epochs, ctx.device, callbacks, eval_model=model)
    if resume_loop is not None:
        loop.load_state_dict(resume_loop)
        if logger is not None:
            logger.restore(resume_loop.get("mlflow_pending", []))
        ctx.log(f"[{stage['name']}] resumed at epoch {loop.epoch}")
    history = loop.run()
    test = evaluate(model, test_loader, ctx.device, splits.num_classes)
    result = {**{k: v for k, v in stage.items()}, "test_top1": test["top1"],
              "val_top1": history[-1]["val_top1"] if history else float("nan"),
              "params": sum(p.numel() for p in model.parameters()),
              "epoch_time_s": sum(h["epoch_time_s"] for h in history) / max(len(history), 1)}
    if "top5" in test:
        result["test_top5"] = test["top5"]
    if getattr(teacher, "rows_per_worker", None):  # a cache read as Ray Data shards: rows each worker held
        result.update(cache_rows=teacher.num_samples * teacher.views, cache_rows_held_max=max(teacher.rows_per_worker))
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    job_state["done"][stage["name"]] = result
    if stage.get("keep"):
        job_state["weights"][stage["name"]] = weights
    if logger is not None:  # before the stage-end checkpoint: a crash in between redoes (idempotent) logging
        final = {f"test_{k}": v for k, v in test.items()}
        logger.finish(final, history, weights, {"model": spec.model, "args": spec.args,
                                                "num_classes": splits.num_classes},
                      example=example, dataset=cfg.data.name, splits=splits)
    ctx.checkpoints.save({**job_state, "stage": stage["name"], "loop": None},
                         {"stage": stage["name"], "test_top1": result["test_top1"]})
    return result


def run_job(cfg: Config, ctx: WorkerContext) -> list[dict]:
    """Run every stage not already done (per the latest checkpoint); return one result per stage."""
    splits = build_splits(cfg)
    saved = ctx.checkpoints.latest() or {}
    job_state = {"done": dict(saved.get("done", {})), "weights": dict(saved.get("weights", {}))}
    start = time.perf_counter()
    stages = plan_stages(cfg)
    for stage in stages:
        if stage["name"] in job_state["done"]:
            continue
        resume_loop = saved.get("loop") if saved.get("stage") == stage["name"] else None
        run_stage(cfg, stage, splits, ctx, job_state, resume_loop)
    ctx.log(f"job {cfg.name}: {len(job_state['done'])} stages done in {time.perf_counter() - start:.1f}s")
    from kdray.orchestrator.schemes import get_scheme

    scheme = get_scheme(cfg.scheme)
    if scheme.finish_inputs(cfg, stages):  # a job-level step after the stages (born-again's ensemble)
        scheme.finish(cfg, stages, splits, ctx, job_state)
    return [job_state["done"][s["name"]] for s in stages]


def build_splits(cfg: Config):
    """The job's dataset splits, as every worker, task and check builds them."""
    return build_datasets(cfg.data.name, root=cfg.data.root, **data_options(cfg))


def data_options(cfg: Config) -> dict:
    """The dataset's builder options as every split is built with them (CIFAR's ``download`` comes from
    ``data.download``); a teacher cache records them to tell whether it was made from the same data."""
    opts = dict(cfg.data.options)
    if cfg.data.name in ("cifar10", "cifar100"):
        opts.setdefault("download", cfg.data.download)
    return opts
