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
    return "+".join(m.name for m in cfg.methods)


def _stage(name: str, kind: str, seed: int, spec: str, model: str, teachers: list[str] | None = None,
           **extra) -> dict:
    """A stage row: ``spec`` is the config path of its model (``student``, ``teachers.1``, ...), ``teachers``
    its teacher sources (``stage:<name>`` = weights trained earlier in the job, ``spec:<path>`` = a
    teacher given by checkpoint / MLflow URI)."""
    row = {"name": name, "kind": kind, "seed": seed, "spec": spec, "model": model, **extra}
    if teachers:
        row["teachers"] = teachers
    return row


def _teacher_sources(cfg: Config, stages: list[dict]) -> list[str]:
    """Train the configured teachers that need training (as stages), and name every teacher's source."""
    sources = []
    specs = cfg.teacher_specs()
    for i, spec in enumerate(specs):
        path = f"teachers.{i}" if cfg.scheme == "multi_teacher" else "teacher"
        name = f"teacher-{i}" if len(specs) > 1 else "teacher"
        if spec.train is not None:
            stages.append(_stage(name, "teacher", cfg.seeds[0], path, spec.model, keep=True))
            sources.append(f"stage:{name}")
        else:
            sources.append(f"spec:{path}")
    return sources


def plan_stages(cfg: Config) -> list[dict]:
    """The ordered stages of a job, by scheme; each becomes one MLflow child run.

    offline: [teacher] -> per seed [scratch] + distilled student. assistant (TAKD): teacher -> assistant 1
    -> ... -> per seed the student, each taught by the previous model. multi_teacher: [teachers] -> per seed
    the student taught by their ensemble. online: per seed [peers trained independently] + the cohort.
    self: per seed born-again generations (each taught by the previous) or BYOT, with [scratch].
    """
    stages: list[dict] = []
    student = ("student", cfg.student.model)
    if cfg.scheme == "online":
        peers = [p.model for p in cfg.online.peers]  # each peer gets its own MLflow run under the stage's
        for seed in cfg.seeds:
            if cfg.baseline:
                stages.append(_stage(f"independent-seed{seed}", "independent", seed, "online.peers", "peers",
                                     peers=peers))
            stages.append(_stage(f"{cfg.online.mode}-seed{seed}", "online", seed, "online.peers", "peers",
                                 peers=peers, methods=method_label(cfg)))
        return stages
    if cfg.scheme == "self":
        for seed in cfg.seeds:
            if cfg.baseline:
                stages.append(_stage(f"scratch-seed{seed}", "scratch", seed, *student))
            if cfg.self_distill.method == "byot":
                stages.append(_stage(f"byot-seed{seed}", "byot", seed, *student))
                continue
            previous = None
            for gen in range(cfg.self_distill.generations):
                name = f"gen{gen}-seed{seed}"
                kind = "generation" if gen else "scratch"
                stages.append(_stage(name, kind, seed, *student, [f"stage:{previous}"] if previous else None,
                                     keep=True, generation=gen))
                previous = name
        return stages
    sources = _teacher_sources(cfg, stages)
    if cfg.scheme == "assistant":
        for i, spec in enumerate(cfg.assistants):
            name = f"assistant-{i}"
            stages.append(_stage(name, "assistant", cfg.seeds[0], f"assistants.{i}", spec.model, sources,
                                 keep=True, methods=method_label(cfg)))
            sources = [f"stage:{name}"]
    for seed in cfg.seeds:
        if cfg.baseline:
            stages.append(_stage(f"scratch-seed{seed}", "scratch", seed, *student))
        stages.append(_stage(f"{method_label(cfg)}-seed{seed}", "distill", seed, *student, sources,
                             methods=method_label(cfg)))
    return stages


def model_spec(cfg: Config, path: str):
    """The ModelSpec at a config path such as ``student``, ``teacher``, ``teachers.1``, ``assistants.0``."""
    node = cfg
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def _unwrap_state(state: dict) -> dict:
    """RepDistiller / mdistiller save ``{"model": state_dict, ...}``; accept those and plain state_dicts."""
    for key in ("model", "state_dict", "student"):
        if key in state and isinstance(state[key], dict):
            return state[key]
    return state


def load_weights(model: nn.Module, state: dict, source: str, num_classes: int) -> nn.Module:
    """Load ``state`` into ``model``; a class-count or architecture mismatch is a one-line error."""
    state = _unwrap_state(state)
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
    kind, ref = source.split(":", 1)
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

    kind, ref = source.split(":", 1)
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


class _Checkpointer:
    """Epoch-end callback: every ``every`` epochs, checkpoint the job state plus this stage's loop state,
    then flush the epoch metrics it covers to MLflow (never before: a restart would log them twice).
    The unflushed metrics ride in the checkpoint, so a crash right after it loses none; epochs that a
    restart replays are skipped by :class:`StageLogger`. The last epoch is left to the stage end."""

    def __init__(self, ctx: WorkerContext, job_state: dict, stage: str, every: int, logger=None, loop_state=None):
        self.ctx, self.job_state, self.stage, self.every, self.logger = ctx, job_state, stage, every, logger
        self.loop_state = loop_state or (lambda loop: loop.state_dict())  # peer-parallel: every rank's state

    def on_epoch_end(self, epoch, metrics, loop):
        if self.logger is not None:
            self.logger.buffer(epoch, metrics)
        if (epoch + 1) % self.every or epoch + 1 >= loop.epochs:
            return
        pending = self.logger.pending() if self.logger is not None else []
        payload = {**self.job_state, "stage": self.stage, "loop": {**self.loop_state(loop), "mlflow_pending": pending}}
        self.ctx.checkpoints.save(payload, {**metrics, "stage": self.stage})
        if self.logger is not None:
            self.logger.flush()


class _Progress:
    def __init__(self, ctx: WorkerContext, stage: str, epochs: int):
        self.ctx, self.stage, self.epochs = ctx, stage, epochs

    def on_epoch_end(self, epoch, metrics, loop):
        self.ctx.log(f"[{self.stage}] epoch {epoch + 1}/{self.epochs}  loss {metrics['train_loss']:.4f}  "
                     f"val top1 {metrics['val_top1']:.4f}  {metrics['epoch_time_s']:.1f}s")


class _WithStage:
    def __init__(self, callback, stage: dict):
        self.callback, self.stage = callback, stage

    def on_epoch_end(self, epoch, metrics, loop):
        self.callback.on_epoch_end(epoch, {**metrics, "stage": self.stage["name"], "kind": self.stage["kind"]}, loop)


def run_stage(cfg: Config, stage: dict, splits, ctx: WorkerContext, job_state: dict,
              resume_loop: dict | None) -> dict:
    """Train one model (teacher, student from scratch, or distilled student), record it in ``job_state``
    and checkpoint that; return its result row."""
    kind, seed = stage["kind"], stage["seed"]
    if kind in ("online", "independent"):
        from kdray.orchestrator.online import run_online_stage

        return run_online_stage(cfg, stage, splits, ctx, job_state, resume_loop)
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
    callbacks = [_Checkpointer(ctx, job_state, stage["name"], cfg.checkpoint.every_epochs, logger)]
    if ctx.rank == 0:
        callbacks.append(_Progress(ctx, stage["name"], optim.epochs))
    callbacks += [_WithStage(cb, stage) for cb in ctx.callbacks]
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
    if cfg.scheme == "self" and cfg.self_distill.method == "born_again":
        from kdray.orchestrator.online import evaluate_generation_ensembles

        evaluate_generation_ensembles(cfg, stages, splits, ctx, job_state)
    return [job_state["done"][s["name"]] for s in stages]


def build_splits(cfg: Config):
    """The job's dataset splits, as every worker, task and check builds them."""
    return build_datasets(cfg.data.name, root=cfg.data.root, **_data_options(cfg))


def _data_options(cfg: Config) -> dict:
    opts = dict(cfg.data.options)
    if cfg.data.name in ("cifar10", "cifar100"):
        opts.setdefault("download", cfg.data.download)
    return opts
