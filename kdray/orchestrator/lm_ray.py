"""LM distillation steps on Ray Train: sharded teachers (:class:`~kdray.orchestrator.lm_placement.ShardedLMTeachers`)
and a DDP or FSDP2 student, one ``TorchTrainer`` run.

:class:`LMPlacementJob` is everything a worker needs, picklable: builders for the student and the teachers
(functions of no argument, e.g. ``functools.partial(tiny_causal_lm, vocab, seed=...)``, so each worker builds
its own copies), the global batches of token ids and completion masks, and the step's loss settings. Each
worker trains on its contiguous slice of every global batch (``torch.tensor_split`` by rank); the loss is the
token loss of :mod:`kdray.algorithms.lm.token_loss` against the combined teachers, scaled by
:func:`~kdray.orchestrator.lm_placement.global_token_scale` so the ranks' averaged gradient is the
one-process gradient on the global batch. :func:`lm_train_worker` is also callable in any process group
(tests use ``torch.multiprocessing``); :func:`run_lm_on_ray` runs it as a ``TorchTrainer`` on ``workers`` CPU
or GPU workers (``parallel_strategy=None`` for FSDP2, Ray's ``"fsdp"`` being FSDP1).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from kdray.algorithms.lm.generation import causal_logits
from kdray.algorithms.lm.token_loss import next_token_mask, token_distill_loss
from kdray.algorithms.lm.vocabulary import lm_vocab_size
from kdray.orchestrator.interrupts import fit_as_interruptible
from kdray.orchestrator.lm_placement import (STUDENT_SHARDING, ShardedLMTeachers, full_student_state,
                                             global_token_scale, load_student_checkpoint, save_student_checkpoint,
                                             shard_student)
from kdray.orchestrator.runtime import train_controller_env


@dataclass
class LMPlacementJob:
    """What one LM distillation run on several workers needs (see the module doc)."""

    student: Callable[[], nn.Module]
    teachers: list[Callable[[], nn.Module]]
    batches: list[tuple[torch.Tensor, torch.Tensor]]  # global (input_ids (B, L), completion_mask (B, L))
    divergence: str = "forward_kl"
    temperature: float = 1.0
    divergence_kwargs: dict = field(default_factory=dict)
    rule: str = "mean"
    weights: list[float] | None = None
    lr: float = 0.1
    momentum: float = 0.9
    student_sharding: str = "ddp"  # ddp | fsdp
    teacher_dtype: torch.dtype | None = None  # e.g. torch.bfloat16 for the hosted teachers
    checkpoint_path: str | None = None  # the sharded student's full checkpoint (written on rank 0)
    checkpoint_every: int = 0  # steps; 0: never
    stop_after: int | None = None  # stop after this many steps in total (an interrupted run, for resume)

    def __post_init__(self):
        if self.student_sharding not in STUDENT_SHARDING:
            raise ValueError(f"student_sharding {self.student_sharding!r}: allowed {', '.join(STUDENT_SHARDING)}")


def lm_train_worker(job: LMPlacementJob, rank: int, world: int, wrap_ddp: Callable[[nn.Module], nn.Module] | None
                    = None) -> dict:
    """Train on this rank's rows of ``job.batches`` (resuming from ``job.checkpoint_path`` when it exists);
    return, on every rank, the full student state dict (gathered) and every rank's combined teacher log-probs
    of the first step, in rank order (for equivalence checks against one process)."""
    student = job.student()
    ensemble = ShardedLMTeachers([build() for build in job.teachers], rank, world, job.rule, job.weights,
                                 job.teacher_dtype, student_vocab_size=lm_vocab_size(student))
    if job.student_sharding == "fsdp":
        module = shard_student(student)
    else:
        module = wrap_ddp(student) if wrap_ddp is not None else nn.parallel.DistributedDataParallel(student)
    optimizer = torch.optim.SGD(module.parameters(), lr=job.lr, momentum=job.momentum)
    start = 0
    if job.checkpoint_path and os.path.exists(job.checkpoint_path):
        start = load_student_checkpoint(job.checkpoint_path, module, optimizer)
    end = len(job.batches) if job.stop_after is None else min(job.stop_after, len(job.batches))
    first_combined, losses = None, []
    for step in range(start, end):
        ids, mask = (torch.tensor_split(t, world)[rank] for t in job.batches[step])
        combined = ensemble(ids)
        if first_combined is None:
            first_combined = combined
        target_mask = next_token_mask(mask)
        loss = token_distill_loss(causal_logits(module, ids)[:, :-1], combined[:, :-1], target_mask,
                                  job.divergence, job.temperature, **job.divergence_kwargs)
        optimizer.zero_grad()
        (loss * global_token_scale(target_mask)).backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if job.checkpoint_path and job.checkpoint_every and (step + 1) % job.checkpoint_every == 0:
            save_student_checkpoint(job.checkpoint_path, module, optimizer, step + 1)
    state = full_student_state(module) if job.student_sharding == "fsdp" else {
        k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
    combined_all = None
    if first_combined is not None:
        parts: list = [None] * world
        dist.all_gather_object(parts, first_combined.cpu())
        combined_all = torch.cat(parts)
    return {"state": state, "combined": combined_all, "losses": losses, "start": start}


def _map_tensors(value, fn):
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, fn) for v in value)
    return fn(value)


def _ray_worker(loop_config: dict) -> dict:
    import ray.train
    import ray.train.torch

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    job = loop_config["job"]
    result = lm_train_worker(job, ctx.get_world_rank(), ctx.get_world_size(),
                             wrap_ddp=lambda m: ray.train.torch.prepare_model(m, parallel_strategy="ddp"))
    # Train refuses tensors in a return value (they fail to deserialize on the driver): numpy arrays cross
    return _map_tensors(result, lambda v: v.float().numpy() if isinstance(v, torch.Tensor) else v)


def run_lm_on_ray(job: LMPlacementJob, workers: int, storage_path: str, name: str = "lm-placement",
                  use_gpu: bool = False, start_timeout_s: float = 60.0) -> dict:
    """Run :func:`lm_train_worker` on ``workers`` Ray Train workers; rank 0's result (see there).

    Fitted like every kdray Train job: Ctrl-C ends as ``KeyboardInterrupt`` with Train's own SIGINT handler
    removed afterwards (it would outlive ``fit()``), and the controller polls reports every 0.1 s."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if workers < 1:
        raise ValueError(f"run_lm_on_ray needs >= 1 worker, got {workers}")
    trainer = TorchTrainer(_ray_worker, train_loop_config={"job": job},
                           scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
                           run_config=RunConfig(name=name, storage_path=storage_path))
    with train_controller_env(start_timeout_s):
        result = fit_as_interruptible(trainer).return_value
    return _map_tensors(result, lambda v: torch.from_numpy(v) if hasattr(v, "__array__") and not
                        isinstance(v, (int, float)) else v)
