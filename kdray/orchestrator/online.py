"""Running the online (peer) and born-again schemes' stages on the job's workers.

Online stages: with one worker (or in-process) all K peers live in one :class:`PeerCohort`; with K x D
workers each peer has D workers (:class:`PeerReplica`, placed by :class:`~kdray.orchestrator.placement.PeerGrid`):
the K ranks of a cohort read the same batch and all-gather logits (and exchanged features) every step, the
D replicas of a peer all-reduce its gradients. Each peer also gets its own nested MLflow run.
``independent`` stages train the same peers with the mutual term switched off (weight 0), the baseline
that DML must beat.
"""
from __future__ import annotations

import statistics

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from torch.nn.parallel import DistributedDataParallel

from kdray.algorithms.base import KnowledgeTerm
from kdray.algorithms.engine import TrainLoop, evaluate, seed_everything
from kdray.algorithms.precision import to_channels_last
from kdray.algorithms.schemes.online import PeerCohort, PeerReplica
from kdray.config import Config, ConfigError
from kdray.orchestrator.build import (build_optimizer, build_peers, build_teacher_model, build_terms, example_batch,
                                      worker_cpus)
from kdray.orchestrator.callbacks import Checkpointer, Progress, WithStage
from kdray.orchestrator.interrupts import sigint_held
from kdray.orchestrator.placement import PeerGrid, WorkerContext, same_batch_loaders
from kdray.orchestrator.plan import Stage, from_stage
from kdray.orchestrator.run_dir import Checkpoint, JobState


def _term_factory(cfg: Config, stage: Stage):
    """Knowledge terms between peers (``methods:`` of an online config); none for the independent baseline."""
    if stage.kind != "online" or not cfg.methods:
        return None
    return lambda: build_terms(cfg)


def _phased(module) -> bool:
    return any(type(t).uses_hard_labels is not KnowledgeTerm.uses_hard_labels for t in module.modules()
               if isinstance(t, KnowledgeTerm))


class PeerMetrics:
    """Adds each peer's validation top-1 to the epoch metrics (``peer{k}_val_top1``); peer-parallel, it
    also collects the other ranks' per-peer training losses from replica 0, so rank 0 logs every peer."""

    def __init__(self, peers: dict[int, torch.nn.Module], val_loader, device, num_classes: int,
                 world_size: int, num_peers: int):
        self.peers, self.val_loader, self.device, self.num_classes = peers, val_loader, device, num_classes
        self.world_size, self.num_peers = world_size, num_peers

    def on_epoch_end(self, epoch, metrics, loop):
        local = {f"peer{k}_val_top1": metrics["val_top1"] if m is loop.eval_model else  # the loop evaluated it
                 evaluate(m, self.val_loader, self.device, self.num_classes, reduce=False)["top1"]
                 for k, m in self.peers.items()}
        if self.world_size > 1:
            local.update({k: v for k, v in metrics.items() if k.startswith("train_peer")})
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, local)
            for row in gathered[: self.num_peers]:  # replica 0 of every peer
                metrics.update(row)
        else:
            metrics.update(local)


class PeerRuns:
    """The stage's MLflow run plus one nested run per peer: every ``peer{k}_*`` epoch metric also goes to
    peer k's run without the prefix (``train_peer0_ce`` -> ``train_ce``). Same interface as
    :class:`~kdray.orchestrator.tracking.StageLogger`, so checkpoints carry every run's pending rows."""

    def __init__(self, stage_logger, peer_loggers: list):
        self.loggers = [stage_logger, *peer_loggers]

    @staticmethod
    def peer_view(metrics: dict, k: int) -> dict:
        tag = f"peer{k}_"
        out = {key.replace(tag, "", 1): v for key, v in metrics.items() if tag in key}
        out["train_loss"] = sum(v for key, v in out.items() if key.startswith("train_"))
        if "epoch" in metrics:
            out["epoch"] = metrics["epoch"]
        return out

    def buffer(self, epoch: int, metrics: dict) -> None:
        self.loggers[0].buffer(epoch, metrics)
        for k, logger in enumerate(self.loggers[1:]):
            logger.buffer(epoch, self.peer_view(metrics, k))

    def pending(self) -> list[dict]:
        return [{**row, "run": i} for i, lg in enumerate(self.loggers) for row in lg.pending()]

    def restore(self, rows: list[dict]) -> None:
        for i, logger in enumerate(self.loggers):
            logger.restore([r for r in rows if int(r.get("run", 0)) == i])

    def flush(self) -> None:
        for logger in self.loggers:
            logger.flush()


def _open_loggers(ctx, stage: Stage, num_peers: int, system_metrics: bool = False):
    if ctx.rank != 0 or not ctx.tracking_uri or stage.name not in ctx.stage_run_ids:
        return None
    from kdray.orchestrator.tracking import StageLogger, peer_run_key

    peers = [StageLogger(ctx.tracking_uri, ctx.stage_run_ids[peer_run_key(stage.name, k)])
             for k in range(num_peers) if peer_run_key(stage.name, k) in ctx.stage_run_ids]
    # system metrics on the stage run only: the peers train in the same process
    stage_logger = StageLogger(ctx.tracking_uri, ctx.stage_run_ids[stage.name], system_metrics)
    return PeerRuns(stage_logger, peers) if len(peers) == num_peers else stage_logger


def _gather_to_rank0(obj, ctx) -> list | None:
    """Every rank's ``obj`` on rank 0 (rank order), ``None`` elsewhere; in-process just ``[obj]``."""
    if ctx.world_size == 1:
        return [obj]
    out = [None] * ctx.world_size if ctx.rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def run_online_stage(cfg: Config, stage: Stage, splits, ctx: WorkerContext, job_state: JobState,
                     resume_loop: dict | None) -> dict:
    """Train one cohort of peers (or the same peers independently) and record every peer's result."""
    num_peers, seed = len(cfg.online.peers), stage.seed
    weight = cfg.online.weight if stage.kind == "online" else 0.0
    peer_parallel = ctx.world_size > 1
    if peer_parallel and ctx.world_size % num_peers:
        raise ConfigError(f"scheme 'online' with {num_peers} peers needs ray.num_workers = {num_peers} x D "
                          f"(D replicas of each peer) or 0/1 (all peers in one process); got {ctx.world_size}")
    make_terms = _term_factory(cfg, stage)
    example = example_batch(splits.train)
    models = build_peers(cfg, seed, splits.num_classes)
    grid = PeerGrid(num_peers, ctx.rank, ctx.world_size) if peer_parallel else None
    if peer_parallel:
        module = PeerReplica(models, grid.peer, grid.gather, cfg.online.mode, weight, cfg.online.temperature,
                             make_terms)
        module.build(example, len(splits.train), seed)
        grid.hand_term_group(module)
        local_peers = {grid.peer: module.peer}
    else:
        module = PeerCohort(models, cfg.online.mode, weight, cfg.online.temperature, make_terms)
        module.build(example, len(splits.train), seed)
        local_peers = dict(enumerate(module.peers))
    module.to(ctx.device)
    if cfg.train.channels_last:  # before the DDP wrap: DDP lays out its gradient buckets by parameter strides
        to_channels_last(module)
    trainable = module
    if grid is not None and grid.replicas > 1:  # D replicas of this peer: gradients all-reduced in its group
        if cfg.ray.sync_batchnorm and ctx.device.type == "cuda":  # BN statistics over this peer's replicas
            module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group=grid.peer_group)
        trainable = DistributedDataParallel(
            module, process_group=grid.peer_group, find_unused_parameters=_phased(module),
            device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
    seed_everything(seed)
    opt = cfg.train
    replicas = grid.replicas if grid is not None else 1
    train_loader, val_loader, test_loader = same_batch_loaders(
        splits, max(1, opt.batch_size // replicas), seed, cfg.data.loader_workers,
        grid.replica if grid is not None else 0, replicas, device=ctx.device, pipeline=cfg.data.pipeline,
        cpus=worker_cpus(cfg))
    optimizer, scheduler = build_optimizer((p for p in module.parameters() if p.requires_grad), opt)
    logger = _open_loggers(ctx, stage, num_peers, cfg.mlflow.system_metrics)
    # Peer-parallel, each rank holds different weights: a checkpoint gathers every rank's loop state.
    loop_state = (lambda loop: {"ranks": _gather_to_rank0(loop.state_dict(), ctx)}) if peer_parallel else None
    callbacks = [PeerMetrics(local_peers, val_loader, ctx.device, splits.num_classes, ctx.world_size, num_peers),
                 Checkpointer(ctx, job_state, stage.name, cfg.checkpoint.every_epochs, logger, loop_state)]
    if ctx.rank == 0:
        callbacks.append(Progress(ctx, stage.name, opt.epochs))
    callbacks += [WithStage(cb, stage) for cb in ctx.callbacks]
    first_peer = next(iter(local_peers.values()))
    loop = TrainLoop(trainable, None, optimizer, scheduler, train_loader, val_loader, splits.num_classes, opt.epochs,
                     ctx.device, callbacks, eval_model=first_peer, eval_reduce=False, precision=opt.precision,
                     channels_last=opt.channels_last, compile=opt.compile)
    if resume_loop is not None:
        own = resume_loop
        if "ranks" in resume_loop:
            if len(resume_loop["ranks"]) != ctx.world_size:
                raise ConfigError(f"stage {stage.name!r} was checkpointed with {len(resume_loop['ranks'])} "
                                  f"workers; resume it with ray.num_workers={len(resume_loop['ranks'])}")
            own = resume_loop["ranks"][ctx.rank]
        loop.load_state_dict(own)
        if logger is not None:
            logger.restore(resume_loop.get("mlflow_pending", []))
        ctx.log(f"[{stage.name}] resumed at epoch {loop.epoch}")
    history = loop.run()
    local_acc = {k: evaluate(m, test_loader, ctx.device, splits.num_classes, reduce=False)["top1"]
                 for k, m in local_peers.items()}
    local_weights = {k: {n: v.detach().cpu() for n, v in m.state_dict().items()} for k, m in local_peers.items()}
    accs, weights = {}, {}
    for row in _gather_to_rank0((local_acc, local_weights), ctx) or []:
        for k in row[0]:
            accs.setdefault(k, row[0][k])
            weights.setdefault(k, row[1][k])
    if peer_parallel:  # every rank needs the result row (the job returns it from each worker)
        box = [accs]
        dist.broadcast_object_list(box, src=0)
        accs = box[0]
    accs = [float(accs[k]) for k in range(num_peers)]
    result = {**stage.row(), "test_top1": statistics.mean(accs), "peer_test_top1": accs,
              "val_top1": history[-1]["val_top1"] if history else float("nan"),
              "params": sum(p.numel() for m in models for p in m.parameters()),
              "epoch_time_s": statistics.mean(h["epoch_time_s"] for h in history) if history else 0.0}
    job_state.done[stage.name] = result
    if logger is not None:
        _finish_runs(cfg, logger, accs, history, weights, splits, result["test_top1"], example)
    ctx.checkpoints.save(Checkpoint(job_state, stage.name).to_payload(),
                         {"stage": stage.name, "test_top1": result["test_top1"]})
    return result


def _finish_runs(cfg: Config, logger, accs: list[float], history: list[dict], weights: dict, splits,
                 mean_acc: float, example) -> None:
    """Close the stage run (peer 0's weights, every peer's accuracy) and each peer's own run."""
    specs = [{"model": p.model, "args": p.args, "num_classes": splits.num_classes} for p in cfg.online.peers]
    data = {"example": example, "dataset": cfg.data.name, "splits": splits}
    final = {f"peer{k}_test_top1": a for k, a in enumerate(accs)}
    final["test_top1"] = mean_acc
    if isinstance(logger, PeerRuns):
        stage_logger, peer_loggers = logger.loggers[0], logger.loggers[1:]
        for k, peer_logger in enumerate(peer_loggers):
            peer_logger.finish({"test_top1": accs[k]}, [PeerRuns.peer_view(h, k) for h in history], weights[k],
                               specs[k], **data)
    else:
        stage_logger = logger
    if history:
        from kdray.orchestrator.plots import peer_curves

        with sigint_held():  # see kdray.orchestrator.interrupts
            figure = peer_curves(history, len(accs), "val top-1 per peer")
            stage_logger.client.log_figure(stage_logger.run_id, figure, "peer_curves.png")
    stage_logger.finish(final, history, weights[0], specs[0], **data)


@torch.no_grad()
def evaluate_generation_ensembles(cfg: Config, stages: list[Stage], splits, ctx: WorkerContext,
                                  job_state: JobState) -> None:
    """Born-again networks: test accuracy of the ensemble (mean logits) of all generations, per seed."""
    test = DataLoader(splits.test, batch_size=256)
    for seed in cfg.seeds:
        gens = [s for s in stages if s.seed == seed and s.generation is not None]
        models = [build_teacher_model(cfg, from_stage(s.name), splits.num_classes, job_state.weights,
                                      None).to(ctx.device).eval() for s in gens]
        correct = total = 0
        for x, y, _ in test:
            x, y = x.to(ctx.device), y.to(ctx.device)
            logits = torch.stack([m(x) for m in models]).mean(0)
            correct += int((logits.argmax(1) == y).sum())
            total += y.numel()
        job_state.done[gens[-1].name]["ensemble_test_top1"] = correct / max(total, 1)
