"""Ray placement for a job: start or join Ray, and run the job as one ``TorchTrainer`` run.

Data-parallel students: each worker holds a replica of the distiller (student + connectors, wrapped in
DDP by ``prepare_model``) and its own frozen copy of the teacher (never wrapped).
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys

import torch

from kdray.config import Config, ConfigError
from kdray.orchestrator.interrupts import fit_as_interruptible, reclaim_sigterm

START_TIMEOUT_VAR = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # read by Train's controller (forwarded from here)


def ensure_ray(address: str | None = None) -> None:
    """Join ``address`` / ``RAY_ADDRESS`` when given, else start a local Ray for this process. ``ray.init``
    replaces the SIGTERM handler; the CLI's is put back (see kdray/orchestrator/interrupts.py)."""
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            ray.init(address="local", include_dashboard=True, log_to_driver=True)
    reclaim_sigterm()


def cluster_may_autoscale() -> bool:
    """Whether the Ray cluster may grow (an autoscaler with node types to launch) or is fixed-size.

    Ray 2.60 has no public call for this. An autoscaler v2 reports its cluster config to the GCS (Train then
    checks a job against that maximum itself). The v1 monitor, which every head runs, writes its status to
    the internal KV; without a cluster config (a local Ray, ``ray start`` by hand) it runs a read-only
    provider that names each node's type ``node_<node id>``: that cluster never grows. When it cannot tell,
    it answers True (a bounded wait is safer than refusing a job a cluster could have run)."""
    try:
        from ray._private import ray_constants
        from ray._private.state import state
        from ray.autoscaler.v2.utils import is_autoscaler_v2
        from ray.experimental.internal_kv import _internal_kv_get

        if state.get_cluster_config() is not None or is_autoscaler_v2(fetch_from_server=True):
            return True
        status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        mapping = json.loads(status)["autoscaler_report"]["node_type_mapping"] if status else None
    except Exception:  # noqa: BLE001  (another Ray version, a GCS hiccup: cannot tell)
        return True
    return not mapping or any(kind != f"node_{node}" for node, kind in mapping.items())


def worker_bundle(cfg: Config, use_gpu: bool) -> dict[str, float]:
    """What one Train worker (or one stage task) reserves."""
    return {"CPU": float(cfg.ray.cpus_per_worker), **({"GPU": 1.0} if use_gpu else {})}


def check_fits(cfg: Config, workers: int, use_gpu: bool, what: str = "ray.num_workers") -> None:
    """Fail in one line, before anything starts, when ``workers`` bundles can never be placed: on a
    fixed-size cluster Train would wait for them forever (its start timeout is retried without limit). On
    a cluster that may autoscale, say that the wait begins (bounded by ``ray.start_timeout_s``).
    Identical bundles pack exactly node by node, so the count that fits is a sum of per-node quotients."""
    import ray

    bundle = worker_bundle(cfg, use_gpu)
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    room = sum(min(math.floor(node.get(r, 0) / need + 1e-9) for r, need in bundle.items()) for node in nodes)
    if room >= workers:
        return
    total = ray.cluster_resources()
    have = ", ".join(f"{total.get(r, 0):g} {r}" for r in bundle)
    per = " + ".join(f"{v:g} {r}" for r, v in bundle.items())
    if cluster_may_autoscale():
        print(f"kdray: {what}={workers} needs {workers} x ({per}) and the Ray cluster has {have} now; waiting up "
              f"to ray.start_timeout_s={cfg.ray.start_timeout_s:g} for the autoscaler to add nodes", flush=True)
        return
    raise ConfigError(f"{what}={workers} needs {workers} x ({per}) but this fixed-size Ray cluster has {have} on "
                      f"{len(nodes)} node(s), room for {room}; lower {what} or ray.cpus_per_worker "
                      f"(or ray.use_gpu), or join a bigger cluster with ray.address")


def _startup_timeout(err: BaseException) -> bool:
    """Whether Train failed because its worker group never got its resources (WorkerGroupStartupTimeoutError)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if "WorkerGroupStartupTimeout" in type(err).__name__ or "WorkerGroupStartupTimeout" in str(err)[:2000]:
            return True
        err = err.__cause__ or err.__context__ or getattr(err, "controller_failure", None)
    return False


def resolve_use_gpu(cfg: Config) -> bool:
    """``ray.use_gpu`` decided: ``auto`` is whether the cluster has a GPU for every worker."""
    if cfg.ray.use_gpu == "auto":
        import ray

        return ray.cluster_resources().get("GPU", 0) >= cfg.ray.num_workers
    return bool(cfg.ray.use_gpu)


def _gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def _prepare(module, sync_batchnorm: bool = False):
    """DDP-wrap the trainable module (a distiller) and hand its terms the world, the group that splits its
    batches. Terms with pre-training phases (FitNet hints, FT paraphraser, AB) leave some parameters without
    gradient for a while, which DDP must be told about."""
    import ray.train.torch
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:  # every rank holds part of each batch
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


def _quiet_train_reports() -> None:
    """Ray Train logs one INFO line per ``report`` (the whole metrics dict) under a logger named after its
    module's file; a checkpoint every few epochs makes that noise in the user's console."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray Train version: its report lines stay
        pass


def _worker_print(message: str) -> None:
    """Progress from a Train worker, once: Train V2 patches ``print`` to go to its logger *and* the
    (redirected) stdout, which the driver then shows twice; the process's own stdout is streamed once."""
    print(message, file=sys.__stdout__, flush=True)


def train_worker(loop_config: dict) -> list[dict]:
    """The Ray Train per-worker function: rebuild the config and run the job with Ray's context."""
    import ray.train
    import ray.train.torch

    from kdray.orchestrator.checkpoints import RayCheckpoints
    from kdray.orchestrator.job import WorkerContext, run_job

    _quiet_train_reports()
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
                          f"this cluster has {_gpus()} GPU(s) for {cfg.ray.num_workers} workers; set "
                          f"ray.sync_batchnorm: false or ray.use_gpu: true on a GPU cluster")
    check_fits(cfg, cfg.ray.num_workers, use_gpu)
    from kdray.orchestrator.teacher_cache import shard_datasets

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
    previous = os.environ.get(START_TIMEOUT_VAR)
    os.environ[START_TIMEOUT_VAR] = str(cfg.ray.start_timeout_s)  # Train forwards it to its controller
    try:
        return fit_as_interruptible(trainer).return_value
    except Exception as err:
        if not _startup_timeout(err):
            raise
        raise ConfigError(_start_timeout_message(cfg, use_gpu)) from None
    finally:
        if previous is None:
            os.environ.pop(START_TIMEOUT_VAR, None)
        else:
            os.environ[START_TIMEOUT_VAR] = previous


def _start_timeout_message(cfg: Config, use_gpu: bool) -> str:
    import ray

    total = ray.cluster_resources()
    per = " + ".join(f"{v:g} {r}" for r, v in worker_bundle(cfg, use_gpu).items())
    have = ", ".join(f"{total.get(r, 0):g} {r}" for r in worker_bundle(cfg, use_gpu))
    return (f"ray.num_workers={cfg.ray.num_workers} x ({per}): the Ray cluster did not provide them within "
            f"ray.start_timeout_s={cfg.ray.start_timeout_s:g} (it has {have}, some may be in use); raise "
            f"ray.start_timeout_s to wait longer for the autoscaler, or lower ray.num_workers")
