"""Running the online (peer) and born-again schemes' stages on the job's workers.

Online stages: with one worker (or in-process) all K peers live in one :class:`PeerCohort`; with K
workers each peer has its own worker (:class:`PeerReplica`), all workers read the same batch and the
peers' logits are all-gathered every step. ``independent`` stages train the same peers with the
mutual term switched off (weight 0), the baseline that DML must beat.
"""
from __future__ import annotations

import statistics

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from kdray.algorithms.engine import TrainLoop, evaluate, seed_everything
from kdray.algorithms.optim import make_optimizer, make_schedule
from kdray.algorithms.schemes.online import PeerCohort, PeerReplica
from kdray.config import Config, ConfigError
from kdray.models import create_model


def build_peers(cfg: Config, seed: int, num_classes: int, only: int | None = None) -> list[torch.nn.Module]:
    """Peer k is initialised from seed ``1000 * seed + k``, wherever it is built (so placements agree)."""
    peers = []
    for k, spec in enumerate(cfg.online.peers):
        if only is not None and k != only:
            continue
        seed_everything(1000 * seed + k)
        peers.append(create_model(spec.model, num_classes, **spec.args))
    return peers


def _same_batch_loaders(splits, batch_size: int, seed: int, loader_workers: int):
    sampler = DistributedSampler(splits.train, 1, 0, shuffle=True, seed=seed)  # identical on every rank
    train = DataLoader(splits.train, batch_size=batch_size, sampler=sampler, num_workers=loader_workers)
    return (train, DataLoader(splits.val, batch_size=256, num_workers=loader_workers),
            DataLoader(splits.test, batch_size=256, num_workers=loader_workers))


def run_online_stage(cfg: Config, stage: dict, splits, ctx, job_state: dict, resume_loop: dict | None) -> dict:
    from kdray.orchestrator.job import _Checkpointer, _Progress, _WithStage
    from kdray.orchestrator.placement import gather_peer_logits

    num_peers, seed = len(cfg.online.peers), stage["seed"]
    weight = cfg.online.weight if stage["kind"] == "online" else 0.0
    peer_parallel = ctx.world_size > 1
    if peer_parallel and ctx.world_size != num_peers:
        raise ConfigError(f"scheme 'online' with {num_peers} peers needs ray.num_workers == {num_peers} "
                          f"(one peer per worker) or 0/1 (all peers in one process); got {ctx.world_size}")
    if peer_parallel:
        peer = build_peers(cfg, seed, splits.num_classes, only=ctx.rank)[0].to(ctx.device)
        module = PeerReplica(peer, ctx.rank, gather_peer_logits, cfg.online.mode, weight, cfg.online.temperature)
        eval_models = [peer]
    else:
        peers = [p.to(ctx.device) for p in build_peers(cfg, seed, splits.num_classes)]
        module = PeerCohort(peers, cfg.online.mode, weight, cfg.online.temperature)
        eval_models = list(module.peers)
    seed_everything(seed)
    train_loader, val_loader, test_loader = _same_batch_loaders(splits, cfg.train.batch_size, seed,
                                                                cfg.data.loader_workers)
    opt = cfg.train
    optimizer = make_optimizer(module.parameters(), opt.optimizer, opt.lr, opt.weight_decay, opt.momentum)
    scheduler = make_schedule(optimizer, opt.schedule, opt.epochs, opt.milestones, opt.gamma)
    logger = None
    if ctx.rank == 0 and ctx.tracking_uri and stage["name"] in ctx.stage_run_ids:
        from kdray.orchestrator.tracking import StageLogger

        logger = StageLogger(ctx.tracking_uri, ctx.stage_run_ids[stage["name"]])
    # Peer-parallel weights live on every rank; mid-stage checkpoints would need them all, so such a
    # stage checkpoints at its end only (a failure restarts the stage).
    every = opt.epochs if peer_parallel else cfg.checkpoint.every_epochs
    callbacks = [_Checkpointer(ctx, job_state, stage["name"], every, logger)]
    if ctx.rank == 0:
        callbacks.append(_Progress(ctx, stage["name"], opt.epochs))
    callbacks += [_WithStage(cb, stage) for cb in ctx.callbacks]
    loop = TrainLoop(module, None, optimizer, scheduler, train_loader, val_loader, splits.num_classes, opt.epochs,
                     ctx.device, callbacks, eval_model=eval_models[0], eval_reduce=False)
    if resume_loop is not None and not peer_parallel:
        loop.load_state_dict(resume_loop)
        if logger is not None:
            logger.restore(resume_loop.get("mlflow_pending", []))
    history = loop.run()
    accs = [evaluate(m, test_loader, ctx.device, splits.num_classes, reduce=False)["top1"] for m in eval_models]
    if peer_parallel:
        gathered = [None] * ctx.world_size
        dist.all_gather_object(gathered, accs[0])
        accs = gathered
    result = {**stage, "test_top1": statistics.mean(accs), "peer_test_top1": [float(a) for a in accs],
              "val_top1": history[-1]["val_top1"] if history else float("nan"),
              "params": sum(p.numel() for m in eval_models for p in m.parameters()),
              "epoch_time_s": statistics.mean(h["epoch_time_s"] for h in history) if history else 0.0}
    job_state["done"][stage["name"]] = result
    if logger is not None:
        final = {f"peer{k}_test_top1": a for k, a in enumerate(accs)}
        final["test_top1"] = result["test_top1"]
        logger.finish(final, history, {k: v.cpu() for k, v in eval_models[0].state_dict().items()},
                      {"model": cfg.online.peers[0].model, "args": cfg.online.peers[0].args,
                       "num_classes": splits.num_classes})
    ctx.checkpoints.save({**job_state, "stage": stage["name"], "loop": None},
                         {"stage": stage["name"], "test_top1": result["test_top1"]})
    return result


@torch.no_grad()
def evaluate_generation_ensembles(cfg: Config, stages: list[dict], splits, ctx, job_state: dict) -> None:
    """Born-again networks: test accuracy of the ensemble (mean logits) of all generations, per seed."""
    from kdray.orchestrator.job import build_teacher_model

    test = DataLoader(splits.test, batch_size=256)
    for seed in cfg.seeds:
        gens = [s for s in stages if s["seed"] == seed and "generation" in s]
        models = [build_teacher_model(cfg, f"stage:{s['name']}", splits.num_classes, job_state["weights"],
                                      None).to(ctx.device).eval() for s in gens]
        correct = total = 0
        for x, y, _ in test:
            x, y = x.to(ctx.device), y.to(ctx.device)
            logits = torch.stack([m(x) for m in models]).mean(0)
            correct += int((logits.argmax(1) == y).sum())
            total += y.numel()
        job_state["done"][gens[-1]["name"]]["ensemble_test_top1"] = correct / max(total, 1)
