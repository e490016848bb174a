"""Ray placement for a job: start or join Ray, and run the job as one ``TorchTrainer`` run.

Data-parallel students: each worker holds a replica of the distiller (student + connectors, wrapped in
DDP by ``prepare_model``) and its own frozen copy of the teacher (never wrapped).
"""
from __future__ import annotations

import os
import sys

import torch

from kdray.config import Config, ConfigError
from kdray.orchestrator.interrupts import fit_as_interruptible
from kdray.orchestrator.ray_internals import quiet_train_reports
from kdray.orchestrator.runtime import check_fits, ensure_ray, gpus, resolve_use_gpu, train_controller_env, worker_bundle



def _startup_timeout(err: BaseException) -> bool:
    """Whether Train failed because its worker group never got its resources (WorkerGroupStartupTimeoutError)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if "WorkerGroupStartupTimeout" in type(err).__name__ or "WorkerGroupStartupTimeout" in str(err)[:2000]:
            return True
        err = err.__cause__ or err.__context__ or getattr(err, "controller_failure", None)
    return False


def _prepare(module, sync_batchnorm: bool = False):
    """DDP-wrap the trainable module (a distiller, or another trainable module of a scheme such as the
    data-free generator) and hand a distiller's terms the world, the group that splits its batches. Terms with pre-training phases (FitNet hints, FT paraphraser, AB) leave some parameters without
    gradient for a while, which DDP must be told about."""
    import ray.train.torch
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1 and hasattr(module, "set_process_group"):
        module.set_process_group(dist.group.WORLD)
    if sync_batchnorm and dist.is_initialized() and dist.get_world_size() > 1:
        if ray.train.torch.get_device().type != "cuda":
            raise ConfigError("ray.sync_batchnorm needs GPU workers (torch's SyncBatchNorm runs on CUDA only)")
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)

    from kdray.algorithms.base import KnowledgeTerm

    phased = any(type(t).uses_hard_labels is not KnowledgeTerm.uses_hard_labels
                 for t in getattr(module, "terms", []))
    return ray.train.torch.prepare_model(module, move_to_device=True,
                                         parallel_strategy_kwargs={"find_unused_parameters": phased})


def _worker_print(message: str) -> None:
    """Progress from a Train worker, once: Train V2 patches ``print`` to go to its logger *and* the
    (redirected) stdout, which the driver then shows twice; the process's own stdout is streamed once."""
    print(message, file=sys.__stdout__, flush=True)


def train_worker(loop_config: dict) -> list[dict]:
    """The Ray Train per-worker function: rebuild the config and run the job with Ray's context."""
    import ray.train
    import ray.train.torch

    from kdray.orchestrator.checkpoints import RayCheckpoints
    from kdray.orchestrator.job import run_job
    from kdray.orchestrator.placement import WorkerContext

    quiet_train_reports()
    cfg = Config.model_validate(loop_config["config"])
    train_ctx = ray.train.get_context()
    rank, world = train_ctx.get_world_rank(), train_ctx.get_world_size()
    torch.set_num_threads(max(1, int(loop_config.get("threads", 1))))
    ctx = WorkerContext(
        rank=rank,
        world_size=world,
        device=ray.train.torch.get_device(),
        checkpoints=RayCheckpoints(rank),
        wrap=lambda m: _prepare(m, cfg.ray.sync_batchnorm),
        tracking_uri=loop_config.get("tracking_uri"),
        stage_run_ids=loop_config.get("stage_run_ids", {}),
        log=_worker_print if rank == 0 and not loop_config.get("quiet") else (lambda msg: None),
        callbacks=list(loop_config.get("callbacks") or []),
    )
    return run_job(cfg, ctx)


def run_on_ray(cfg: Config, tracking_uri: str | None, stage_run_ids: dict[str, str], *,
               epoch_callbacks: list | None = None, run_callbacks: list | None = None,
               quiet: bool = False) -> list[dict]:
    """Run the job as one ``TorchTrainer`` run. ``epoch_callbacks`` (picklable engine callbacks) run in
    every worker after each epoch; ``run_callbacks`` are Ray Train ``RunConfig`` callbacks on the driver
    side (a sweep passes its Tune reporter pair here, so trials reuse this whole placement)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ensure_ray(cfg.ray.address)
    use_gpu = resolve_use_gpu(cfg)
    if cfg.ray.sync_batchnorm and cfg.ray.num_workers > 1 and not use_gpu:
        raise ConfigError(f"ray.sync_batchnorm needs GPU workers (torch's SyncBatchNorm runs on CUDA only) and "
                          f"this cluster has {gpus()} GPU(s) for {cfg.ray.num_workers} workers; set "
                          f"ray.sync_batchnorm: false or ray.use_gpu: true on a GPU cluster")
    check_fits(cfg, cfg.ray.num_workers, use_gpu)
    from kdray.orchestrator.cache_store import shard_datasets

    data = shard_datasets(cfg)  # a teacher cache, as one Ray Dataset per rank (each worker holds its shard)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "tracking_uri": tracking_uri,
                           "stage_run_ids": stage_run_ids, "threads": cfg.ray.cpus_per_worker,
                           "callbacks": list(epoch_callbacks or []), "quiet": quiet},
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.ray.cpus_per_worker}),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=os.path.dirname(cfg.run_dir()),
            # a worker group that cannot start counts against max_failures too (Train's own default: unlimited)
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures,
                                         controller_failure_limit=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            callbacks=list(run_callbacks or []),
        ),
        **data,
    )
    try:
        with train_controller_env(cfg.ray.start_timeout_s):
            return fit_as_interruptible(trainer).return_value
    except Exception as err:
        if not _startup_timeout(err):
            raise
        raise ConfigError(_start_timeout_message(cfg, use_gpu)) from None


def _start_timeout_message(cfg: Config, use_gpu: bool) -> str:
    import ray

    total = ray.cluster_resources()
    per = " + ".join(f"{v:g} {r}" for r, v in worker_bundle(cfg, use_gpu).items())
    have = ", ".join(f"{total.get(r, 0):g} {r}" for r in worker_bundle(cfg, use_gpu))
    return (f"ray.num_workers={cfg.ray.num_workers} x ({per}): the Ray cluster did not provide them within "
            f"ray.start_timeout_s={cfg.ray.start_timeout_s:g} (it has {have}, some may be in use); raise "
            f"ray.start_timeout_s to wait longer for the autoscaler, or lower ray.num_workers")
