"""Placement: which worker hosts which model, and which tensors cross between workers.

- Data-parallel students: every rank holds a replica of the distiller (DDP) and its own frozen teacher.
- Teacher-sharded multi-teacher (:class:`ShardedTeacherEnsemble`): teacher m lives on rank ``m % world``;
  each step the ranks all-gather their input batches, each runs its teachers on the whole gathered batch,
  and one all-reduce hands every rank all M teachers' logits for its own rows. Memory per rank is ~M/world
  teachers; traffic per step is M x (global batch) x classes floats.
- Peer-parallel online distillation (:func:`gather_peer_logits`): peer k lives on rank k, all ranks read the
  same batch, and the peers' logits are all-gathered every step.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from kdray.algorithms.base import ModelOutput
from kdray.algorithms.distiller import Teacher
from kdray.algorithms.schemes.multi_teacher import COMBINE_RULES, combine_logits


def teacher_ranks(num_teachers: int, world_size: int) -> list[int]:
    """The rank hosting each teacher (round-robin)."""
    return [m % world_size for m in range(num_teachers)]


def gather_peer_logits(own: torch.Tensor) -> list[torch.Tensor]:
    """All ranks' logits for the same batch, in rank order (no gradient through the others)."""
    out = [torch.empty_like(own) for _ in range(dist.get_world_size())]
    dist.all_gather(out, own.detach().contiguous())
    return out


class ShardedTeacherEnsemble(nn.Module):
    """A multi-teacher ensemble whose teachers are spread over the data-parallel ranks.

    Gives exactly what :class:`~kdray.algorithms.schemes.multi_teacher.TeacherEnsemble` gives in one
    process (the same combination of the same logits), so students are unaffected by the sharding.
    """

    def __init__(self, models: list[nn.Module], rank: int, world_size: int, rule: str = "mean",
                 weights: list[float] | None = None, seed: int = 0):
        super().__init__()
        if rule not in COMBINE_RULES:
            raise ValueError(f"unknown combine rule {rule!r}; allowed: {', '.join(COMBINE_RULES)}")
        self.num_teachers, self.rank, self.world_size = len(models), rank, world_size
        owners = teacher_ranks(len(models), world_size)
        self.local_ids = [m for m, r in enumerate(owners) if r == rank]
        self.local = nn.ModuleList([Teacher(models[m]) for m in self.local_ids])  # the others are dropped here
        self.rule, self.weights = rule, weights
        self.generator = torch.Generator().manual_seed(seed)  # same on every rank: 'random' picks agree

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, inputs: torch.Tensor) -> ModelOutput:
        sizes = [torch.zeros(1, dtype=torch.long, device=inputs.device) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([inputs.shape[0]], device=inputs.device))
        sizes = [int(s) for s in sizes]
        padded = torch.zeros((max(sizes), *inputs.shape[1:]), dtype=inputs.dtype, device=inputs.device)
        padded[: inputs.shape[0]] = inputs
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded)
        everything = torch.cat([g[:n] for g, n in zip(gathered, sizes)])
        logits = None
        for m, teacher in zip(self.local_ids, self.local):
            out = teacher(everything).logits
            if logits is None:
                logits = torch.zeros((self.num_teachers, *out.shape), dtype=out.dtype, device=out.device)
            logits[m] = out
        if logits is None:  # this rank hosts no teacher: learn the shape from the others
            classes = torch.zeros(1, dtype=torch.long, device=inputs.device)
            dist.all_reduce(classes, op=dist.ReduceOp.MAX)
            logits = torch.zeros((self.num_teachers, everything.shape[0], int(classes)), device=inputs.device)
        else:
            dist.all_reduce(torch.tensor([logits.shape[2]], device=inputs.device), op=dist.ReduceOp.MAX)
        dist.all_reduce(logits)  # each teacher's slot is filled by exactly one rank
        start = sum(sizes[: self.rank])
        mine = logits[:, start: start + inputs.shape[0]]
        return ModelOutput(combine_logits(mine, self.rule, self.weights, self.generator))
