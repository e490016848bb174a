"""The offline stage runner, and the job loop every worker runs: the teacher stage, then each seed's students.

The same function runs in-process (``ray.num_workers: 0``), inside each Ray Train worker and in a stage
task; what differs is supplied in a :class:`~kdray.orchestrator.placement.WorkerContext` (rank, device,
where checkpoints go, how the trainable module is wrapped). All stages of a job run in one Ray Train run,
so several seeds cost one start-up. Stage kinds a scheme trains itself (the online cohort) go to its
``run_stage``; every other kind is :func:`train_stage` here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch.nn as nn

from kdray.algorithms.engine import TrainLoop, seed_everything
from kdray.algorithms.precision import to_channels_last
from kdray.config import Config
from kdray.models import create_model
from kdray.orchestrator.build import (build_distiller, build_optimizer, build_splits, build_stage_teacher,
                                      example_batch, wants_class_pairs, worker_cpus)
from kdray.orchestrator.callbacks import Checkpointer, Progress, WithStage
from kdray.orchestrator.placement import WorkerContext, make_loaders
from kdray.orchestrator.plan import Stage, get_scheme, matched_steps, model_spec, plan_stages
from kdray.orchestrator.run_dir import Checkpoint, JobState


def run_stage(cfg: Config, stage: Stage, splits, ctx: WorkerContext, job_state: JobState,
              resume_loop: dict | None) -> dict:
    """Run one stage the way its scheme runs it (most: :func:`train_stage`; online: the peer cohort). With a
    transfer set, a taught stage trains on the labelled rows plus the unlabelled ones, and the label-only
    student takes as many optimizer steps on the labelled rows alone (:func:`matched_steps`)."""
    scheme = get_scheme(cfg.scheme)
    if splits.transfer_train is not None:
        if stage.teachers:
            cached = [(path, spec) for path, spec in cfg.teacher_paths() if spec.cache]
            if cached:
                path, spec = cached[0]
                raise ValueError(f"{path}.cache {spec.cache} holds outputs of the labelled rows only, but "
                                 f"data.options.labelled adds unlabelled transfer rows: use a teacher checkpoint")
            splits = replace(splits, train=splits.transfer_train)
        elif stage.kind == "scratch":
            cfg = matched_steps(cfg, len(splits.transfer_train), len(splits.train))
    if stage.kind in scheme.own_stage_kinds:
        return scheme.run_stage(cfg, stage, splits, ctx, job_state, resume_loop)
    return train_stage(cfg, stage, splits, ctx, job_state, resume_loop)


@dataclass
class StageParts:
    """What a training stage is built from, assembled by :func:`prepare_stage` for any scheme's runner.

    A scheme that trains its own way (an adversarial discriminator, a data-free generator) takes these parts,
    adds its own trainable modules and makes its own :class:`~kdray.algorithms.engine.TrainLoop` subclass,
    then hands the loop to :func:`complete_stage`: the student, teacher, loaders, checkpointing, progress
    and MLflow logging are then the same as every other stage's."""

    spec: Any  # the ModelSpec / TeacherSpec trained
    optim: Any  # its OptimSpec
    model: nn.Module  # the bare student (what is evaluated, exported and logged)
    distiller: nn.Module  # built, on the device
    trainable: nn.Module  # the distiller as the worker wraps it (DDP on several workers)
    teacher: Any  # the stage's teacher source, or None
    train_loader: Any
    val_loader: Any
    test_loader: Any
    example: Any  # one example input batch (CPU)
    optimizer: Any
    scheduler: Any
    logger: Any  # StageLogger on the logging rank, else None
    callbacks: list = field(default_factory=list)

    def loop_kwargs(self, splits, ctx: WorkerContext) -> dict:
        """The keyword arguments of ``TrainLoop`` (and its subclasses) for these parts."""
        return dict(distiller=self.trainable, teacher=self.teacher, optimizer=self.optimizer,
                    scheduler=self.scheduler, train_loader=self.train_loader, val_loader=self.val_loader,
                    num_classes=splits.num_classes, epochs=self.optim.epochs, device=ctx.device,
                    callbacks=self.callbacks, eval_model=self.model, precision=self.optim.precision,
                    channels_last=self.optim.channels_last, compile=self.optim.compile)


def stage_logging(cfg: Config, stage: Stage, ctx: WorkerContext, job_state: JobState, epochs: int) -> tuple:
    """The stage's MLflow logger (on the logging rank, else ``None``) and its epoch callbacks: checkpoints
    (which flush the logger's buffered metrics), progress on rank 0, the user's callbacks."""
    logger = None
    if ctx.rank == 0 and ctx.tracking_uri and stage.name in ctx.stage_run_ids:
        from kdray.orchestrator.tracking import StageLogger  # MLflow loads only where a stage logs

        logger = StageLogger(ctx.tracking_uri, ctx.stage_run_ids[stage.name], cfg.mlflow.system_metrics)
    callbacks = [Checkpointer(ctx, job_state, stage.name, cfg.checkpoint.every_epochs, logger)]
    if ctx.rank == 0:
        callbacks.append(Progress(ctx, stage.name, epochs))
    callbacks += [WithStage(cb, stage) for cb in ctx.callbacks]
    return logger, callbacks


def prepare_stage(cfg: Config, stage: Stage, splits, ctx: WorkerContext, job_state: JobState) -> StageParts:
    """Seed, then build the stage's student, distiller (terms built on an example batch), teacher, loaders,
    optimizer + schedule and epoch callbacks (checkpoints, progress, the user's), on ``ctx.device``."""
    kind, seed = stage.kind, stage.seed
    seed_everything(seed)
    spec = model_spec(cfg, stage.spec)
    optim = spec.train if kind == "teacher" else cfg.train
    model = create_model(spec.model, splits.num_classes, **spec.args)
    distiller = build_distiller(cfg, model, stage)
    teacher = build_stage_teacher(cfg, stage, distiller, splits, job_state.weights, ctx)
    by_index = getattr(teacher, "wants_batch", False)  # a cache: outputs looked up by the batch's row ids
    train_loader, val_loader, test_loader = make_loaders(splits, optim.batch_size, seed, ctx,
                                                         cfg.data.loader_workers, teacher if by_index else None,
                                                         pipeline=cfg.data.pipeline, cpus=worker_cpus(cfg),
                                                         class_pairs=wants_class_pairs(cfg, distiller))
    example = example_batch(splits.train)
    distiller.build(example, teacher.bind(range(len(example))) if by_index else teacher, len(splits.train))
    distiller.to(ctx.device)
    if teacher is not None:
        teacher.to(ctx.device)
    if optim.channels_last:  # before the DDP wrap: DDP lays out its gradient buckets by parameter strides
        to_channels_last(distiller)
        if teacher is not None:
            to_channels_last(teacher)
    trainable = ctx.wrap(distiller)
    optimizer, scheduler = build_optimizer((p for p in trainable.parameters() if p.requires_grad), optim)
    logger, callbacks = stage_logging(cfg, stage, ctx, job_state, optim.epochs)
    return StageParts(spec, optim, model, distiller, trainable, teacher, train_loader, val_loader, test_loader,
                      example, optimizer, scheduler, logger, callbacks)


def complete_stage(cfg: Config, stage: Stage, splits, ctx: WorkerContext, job_state: JobState, parts: StageParts,
                   loop: TrainLoop, resume_loop: dict | None, extra: dict | None = None) -> dict:
    """Resume ``loop`` where the checkpoint left it, run it, test the student, record the result row (plus
    ``extra`` columns) and the kept weights in ``job_state``, log the stage to MLflow and checkpoint."""
    model, logger = parts.model, parts.logger
    if resume_loop is not None:
        loop.load_state_dict(resume_loop)
        if logger is not None:
            logger.restore(resume_loop.get("mlflow_pending", []))
        ctx.log(f"[{stage.name}] resumed at epoch {loop.epoch}")
    history = loop.run()
    test = loop.evaluate_test(parts.test_loader)
    result = {**stage.row(), "test_top1": test["top1"],
              **{f"test_{k}": v for k, v in test.items() if k not in ("top1", "top5", "loss")},  # per group
              "val_top1": history[-1]["val_top1"] if history else float("nan"),
              "params": sum(p.numel() for p in model.parameters()),
              "epoch_time_s": sum(h["epoch_time_s"] for h in history) / max(len(history), 1), **(extra or {})}
    if "top5" in test:
        result["test_top5"] = test["top5"]
    teacher = parts.teacher
    if getattr(teacher, "rows_per_worker", None):  # a cache read as Ray Data shards: rows each worker held
        result.update(cache_rows=teacher.num_samples * teacher.views, cache_rows_held_max=max(teacher.rows_per_worker))
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    job_state.done[stage.name] = result
    if stage.keep:
        job_state.weights[stage.name] = weights
    if logger is not None:  # before the stage-end checkpoint: a crash in between redoes (idempotent) logging
        final = {f"test_{k}": v for k, v in test.items()}
        logger.finish(final, history, weights, {"model": parts.spec.model, "args": parts.spec.args,
                                                "num_classes": splits.num_classes},
                      example=parts.example, dataset=cfg.data.name, splits=splits)
    ctx.checkpoints.save(Checkpoint(job_state, stage.name).to_payload(),
                         {"stage": stage.name, "test_top1": result["test_top1"]})
    return result


def train_stage(cfg: Config, stage: Stage, splits, ctx: WorkerContext, job_state: JobState,
                resume_loop: dict | None) -> dict:
    """Train one model (teacher, student from scratch, or distilled student), record it in ``job_state``
    and checkpoint that; return its result row."""
    parts = prepare_stage(cfg, stage, splits, ctx, job_state)
    loop = TrainLoop(**parts.loop_kwargs(splits, ctx))
    return complete_stage(cfg, stage, splits, ctx, job_state, parts, loop, resume_loop)


def run_job(cfg: Config, ctx: WorkerContext) -> list[dict]:
    """Run every stage not already done (per the latest checkpoint); return one result per stage."""
    splits = build_splits(cfg)
    saved = Checkpoint.from_payload(ctx.checkpoints.latest())
    job_state = saved.state
    start = time.perf_counter()
    stages = plan_stages(cfg)
    for stage in stages:
        if stage.name in job_state.done:
            continue
        run_stage(cfg, stage, splits, ctx, job_state, saved.resume_loop(stage.name))
    ctx.log(f"job {cfg.name}: {len(job_state.done)} stages done in {time.perf_counter() - start:.1f}s")
    scheme = get_scheme(cfg.scheme)
    if scheme.finish_inputs(cfg, stages):  # a job-level step after the stages (born-again's ensemble)
        scheme.finish(cfg, stages, splits, ctx, job_state)
    return [job_state.done[s.name] for s in stages]
