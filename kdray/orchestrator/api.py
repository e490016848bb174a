"""``kdray.distill``: validate, check everything checkable, open MLflow runs, run the job, close the runs."""
from __future__ import annotations

import os
import statistics
from dataclasses import dataclass

import torch

from kdray.config import Config, ConfigError, load_config
from kdray.orchestrator.job import WorkerContext, plan_stages, run_job


@dataclass
class DistillResult:
    """What a job produced: one row per stage, the MLflow parent run, and a summary by stage kind."""

    stages: list[dict]
    tracking_uri: str | None
    parent_run_id: str | None
    run_dir: str

    def accuracies(self, kind: str) -> list[float]:
        return [s["test_top1"] for s in self.stages if s["kind"] == kind]

    def summary(self) -> dict[str, float]:
        out = {}
        for kind in ("teacher", "scratch", "distill"):
            acc = self.accuracies(kind)
            if acc:
                out[f"{kind}_test_top1_mean"] = statistics.mean(acc)
                if len(acc) > 1:
                    out[f"{kind}_test_top1_std"] = statistics.stdev(acc)
        return out

    def table(self) -> str:
        rows = ["| stage | model | seed | test top-1 | params |", "|---|---|---|---|---|"]
        for s in self.stages:
            rows.append(f"| {s['name']} | {s['model']} | {s['seed']} | {s['test_top1']:.4f} | {s['params']:,} |")
        for kind in ("scratch", "distill"):
            acc = self.accuracies(kind)
            if len(acc) > 1:
                rows.append(f"| **{kind} mean +- std** | | {len(acc)} seeds | "
                            f"{statistics.mean(acc):.4f} +- {statistics.stdev(acc):.4f} | |")
        return "\n".join(rows)


def preflight(cfg: Config) -> None:
    """Checks that need data or models but no training: files exist, shapes and class counts agree,
    feature points resolve. Each failure is a one-line :class:`ConfigError`."""
    from kdray.algorithms.base import create_method
    from kdray.algorithms.distiller import Distiller, Teacher
    from kdray.data import build_datasets
    from kdray.models import create_model
    from kdray.orchestrator.job import _data_options, build_teacher_model

    try:
        splits = build_datasets(cfg.data.name, root=cfg.data.root, **_data_options(cfg))
    except TypeError as err:
        raise ConfigError(f"data.options: {err}") from None
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"data: {err}") from None
    try:
        student = create_model(cfg.student.model, splits.num_classes, **cfg.student.args)
        terms = [create_method(m.name, **m.params()) for m in cfg.methods]
        distiller = Distiller(student, terms, cfg.ce_weight)
        teacher_model = (create_model(cfg.teacher.model, splits.num_classes, **cfg.teacher.args)
                         if cfg.teacher.train is not None
                         else build_teacher_model(cfg, splits.num_classes, None, _tracking_uri(cfg)))
        teacher = Teacher(teacher_model, distiller.resolve_teacher_points(teacher_model))
        example = torch.stack([splits.train[i][0] for i in range(min(2, len(splits.train)))])
        distiller.build(example, teacher, len(splits.train))
        with torch.no_grad():
            t_classes = teacher(example).logits.shape[1]
    except ConfigError:
        raise
    except (ValueError, TypeError, RuntimeError, FileNotFoundError) as err:
        raise ConfigError(str(err).splitlines()[0]) from None
    if t_classes != splits.num_classes:
        raise ConfigError(f"teacher outputs {t_classes} classes but dataset {cfg.data.name!r} has {splits.num_classes}")


def _tracking_uri(cfg: Config) -> str | None:
    if not cfg.mlflow.enabled:
        return None
    from kdray.orchestrator.tracking import resolve_tracking_uri

    return resolve_tracking_uri(cfg.mlflow.tracking_uri)


def _check_run_dir(cfg: Config, resume: bool) -> None:
    from kdray.orchestrator.tracking import RUNS_FILE

    marker = os.path.join(cfg.run_dir(), RUNS_FILE)
    has_ckpt = os.path.exists(os.path.join(cfg.run_dir(), "checkpoint")) or any(
        n.startswith("checkpoint_") for n in (os.listdir(cfg.run_dir()) if os.path.isdir(cfg.run_dir()) else []))
    if not resume and (os.path.exists(marker) or has_ckpt):
        raise ConfigError(f"job {cfg.name!r} already has results in {cfg.run_dir()}; pass --resume to continue it "
                          f"or choose another name=")


def distill(config: str | dict | Config, *, overrides: list[str] | None = None, resume: bool = False,
            log=print, callbacks: list | None = None, parent_run_id: str | None = None) -> DistillResult:
    """Run a distillation job (teacher stage, then students per seed) and track it in MLflow.

    ``ray.num_workers: 0`` runs in this process; otherwise the job is one Ray Train run with that many
    data-parallel workers, on the Ray cluster at ``ray.address`` / ``RAY_ADDRESS`` or a local Ray.
    ``callbacks`` (in-process runs only) get every epoch's metrics; ``parent_run_id`` nests the job's
    MLflow run under another (a sweep's).
    """
    cfg = load_config(config, overrides)
    _check_run_dir(cfg, resume)
    preflight(cfg)
    uri = _tracking_uri(cfg)
    tracking = None
    if uri is not None:
        from kdray.orchestrator.tracking import JobTracking, check_reachable

        check_reachable(uri)
        tracking = JobTracking(uri, cfg.mlflow.experiment, cfg.run_dir(), parent_run_id)
    stages = plan_stages(cfg)
    try:
        stage_ids = (tracking.start(cfg.name, cfg.model_dump(mode="json"), stages, resume)
                     if tracking else {})
        if cfg.ray.num_workers == 0:
            from kdray.orchestrator.checkpoints import LocalCheckpoints

            ctx = WorkerContext(checkpoints=LocalCheckpoints(cfg.run_dir()), tracking_uri=uri,
                                stage_run_ids=stage_ids, log=log, callbacks=list(callbacks or []))
            results = run_job(cfg, ctx)
        else:
            if callbacks:
                raise ConfigError("callbacks= run only in-process; set ray.num_workers: 0")
            from kdray.orchestrator.ray_runner import run_on_ray

            results = run_on_ray(cfg, uri, stage_ids)
        outcome = DistillResult(results, uri, tracking.parent_id if tracking else None, cfg.run_dir())
        if tracking:
            from kdray.orchestrator.plots import grouped_bars

            groups = {k: outcome.accuracies(k) for k in ("teacher", "scratch", "distill") if outcome.accuracies(k)}
            tracking.finish(outcome.summary(), outcome.table(),
                            grouped_bars(groups, "test top-1", f"{cfg.name}: test accuracy"))
        return outcome
    except BaseException as err:
        if tracking:
            tracking.fail(err)
        raise
