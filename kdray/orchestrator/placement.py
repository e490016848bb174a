"""Placement: which worker hosts which model, and which tensors cross between workers.

- Data-parallel students: every rank holds a replica of the distiller (DDP) and its own frozen teacher.
- Teacher-sharded multi-teacher (:class:`ShardedTeacherEnsemble`): teacher m lives on rank ``m % world``;
  each step the ranks all-gather their input batches, each runs its teachers on the whole gathered batch,
  and one all-reduce hands every rank all M teachers' logits (and the feature maps that per-teacher
  feature terms asked for) for its own rows. Memory per rank is ~M/world teachers; traffic per step is
  M x (global batch) x (classes + requested feature sizes) floats.
- Peer-parallel online distillation (:class:`PeerGrid`): K peers x D data-parallel replicas; the ranks of
  one cohort (one replica of each peer) read the same batch and all-gather their logits (and the features
  the peers' terms exchange) every step; each peer's D replicas all-reduce its gradients in their own
  process group, which is also the group its knowledge terms communicate in (:meth:`PeerGrid.hand_term_group`).
- Loaders: each worker's share of the training batches (:func:`make_loaders`; a cohort's ranks read the same
  batches, :func:`same_batch_loaders`) and disjoint evaluation shards.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from kdray.algorithms.base import KnowledgeTerm, ModelOutput
from kdray.algorithms.distiller import Teacher
from kdray.algorithms.packing import OutputLayout
from kdray.algorithms.schemes.multi_teacher import COMBINE_RULES, ensemble_output
from kdray.config import ConfigError
from kdray.data import (ClassPairBatchSampler, NotOnDeviceError, device_batches, device_eval_batches, device_refusal,
                        has_random_transform, loader_options)
from kdray.data.collate import collate_batch
from kdray.data.two_views import split_targets
from kdray.data.views import cached_train_data


@dataclass
class WorkerContext:
    """Where a job's code runs: its rank among ``world_size`` workers, its device, where its checkpoints go,
    how its trainable module is wrapped (DDP on Ray Train) and where it logs. The same stage runners run
    in-process, in a Ray Train worker and in a stage task; this is all that differs."""

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


def _shard(dataset, rank: int, world: int):
    return dataset if world == 1 else Subset(dataset, list(range(rank, len(dataset), world)))


def make_loaders(splits, batch_size: int, seed: int, ctx: WorkerContext, loader_workers: int | None = 0, cache=None,
                 *, pipeline: str = "per_sample", cpus: int | None = None, class_pairs: bool = False):
    """Training batches of ``batch_size // world_size`` per worker (so the global batch is the configured
    one); evaluation on disjoint shards whose counts are summed across ranks (no padding duplicates).

    Shuffling is a function of (seed, epoch) via ``set_epoch``, also with one worker, so a stage resumed at
    epoch k sees exactly the batches the uninterrupted run saw; ``cache``: a teacher cache, whose batches
    carry cache row ids (recorded views, this worker's shard). ``pipeline`` (``data.pipeline``): batches made
    on the device (:func:`~kdray.data.device_batches`: the same samples in the same order) or per sample by a
    DataLoader with ``loader_workers`` processes (None: from ``cpus``). ``class_pairs`` (``data.class_pairs``, or a
    method that reads them): each training batch is this worker's anchors followed by a same-class partner of
    each (:class:`~kdray.data.ClassPairBatchSampler`), per sample, never from a cache."""
    per_worker = max(1, batch_size // ctx.world_size)
    if class_pairs:
        if cache is not None:
            raise ConfigError("data.class_pairs: a teacher cache's batches are fixed views of each sample; class "
                              "pairs need the live teacher or none (drop teacher.cache)")
        pairs = ClassPairBatchSampler(split_targets(splits.train), per_worker, seed, ctx.rank, ctx.world_size)
        kw = loader_options(ctx.device, loader_workers, cpus=cpus, random_transform=has_random_transform(splits.train))
        eval_kw = loader_options(ctx.device, loader_workers, cpus=cpus)
        return (DataLoader(splits.train, batch_sampler=pairs, **kw),
                DataLoader(_shard(splits.val, ctx.rank, ctx.world_size), batch_size=256, **eval_kw),
                DataLoader(_shard(splits.test, ctx.rank, ctx.world_size), batch_size=256, **eval_kw))
    if use_device_pipeline(splits.train, ctx.device, pipeline):
        train = device_batches(splits.train, per_worker, seed=seed, device=ctx.device, rank=ctx.rank,
                               world_size=ctx.world_size, cache=cache)
        return (train, _eval_batches(splits.val, ctx.rank, ctx.world_size, ctx.device),
                _eval_batches(splits.test, ctx.rank, ctx.world_size, ctx.device))
    sampler = DistributedSampler(splits.train, ctx.world_size, ctx.rank, shuffle=True, seed=seed)
    train_set = splits.train
    if cache is not None:
        train_set, sampler = cached_train_data(splits.train, cache, sampler, seed, ctx.world_size)
    kw = loader_options(ctx.device, loader_workers, cpus=cpus, random_transform=has_random_transform(train_set))
    train = DataLoader(train_set, batch_size=per_worker, sampler=sampler, drop_last=False, collate_fn=collate_batch,
                       **kw)
    eval_kw = loader_options(ctx.device, loader_workers, cpus=cpus)
    val = DataLoader(_shard(splits.val, ctx.rank, ctx.world_size), batch_size=256, collate_fn=collate_batch, **eval_kw)
    test = DataLoader(_shard(splits.test, ctx.rank, ctx.world_size), batch_size=256, collate_fn=collate_batch,
                      **eval_kw)
    return train, val, test


def use_device_pipeline(split, device, pipeline: str) -> bool:
    """Whether ``data.pipeline`` puts this training split on the device; ``device`` asked of a split that
    cannot go there is a one-line :class:`ConfigError` saying why."""
    if pipeline == "per_sample":
        return False
    refusal = device_refusal(split, device)
    if refusal is not None and pipeline == "device":
        raise ConfigError(f"data.pipeline=device: the training split cannot live on {device} ({refusal}); use "
                          f"data.pipeline=auto or per_sample")
    return refusal is None


def _eval_batches(split, rank: int, world: int, device):
    """An evaluation shard on the device, or per sample when its transform keeps it off the device."""
    try:
        return device_eval_batches(split, 256, device=device, rank=rank, world_size=world)
    except NotOnDeviceError:
        return DataLoader(_shard(split, rank, world), batch_size=256, collate_fn=collate_batch)


def same_batch_loaders(splits, batch_size: int, seed: int, loader_workers: int | None, shard: int = 0,
                       shards: int = 1, *, device=None, pipeline: str = "per_sample", cpus: int | None = None):
    """Training batches of data shard ``shard`` of ``shards``: identical on every rank of one cohort."""
    device = torch.device("cpu") if device is None else device
    if use_device_pipeline(splits.train, device, pipeline):
        train = device_batches(splits.train, batch_size, seed=seed, device=device, rank=shard, world_size=shards)
        return train, _eval_batches(splits.val, 0, 1, device), _eval_batches(splits.test, 0, 1, device)
    sampler = DistributedSampler(splits.train, shards, shard, shuffle=True, seed=seed)
    kw = loader_options(device, loader_workers, cpus=cpus, random_transform=has_random_transform(splits.train))
    train = DataLoader(splits.train, batch_size=batch_size, sampler=sampler, collate_fn=collate_batch, **kw)
    eval_kw = loader_options(device, loader_workers, cpus=cpus)
    return (train, DataLoader(splits.val, batch_size=256, collate_fn=collate_batch, **eval_kw),
            DataLoader(splits.test, batch_size=256, collate_fn=collate_batch, **eval_kw))


def teacher_ranks(num_teachers: int, world_size: int) -> list[int]:
    """The rank hosting each teacher (round-robin)."""
    return [m % world_size for m in range(num_teachers)]


def gather_peer_logits(own: torch.Tensor, group=None) -> list[torch.Tensor]:
    """All ranks' tensors (of one cohort ``group``) for the same batch, in rank order, without gradient."""
    out = [torch.empty_like(own) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, own.detach().contiguous(), group=group)
    return out


class PeerGrid:
    """K peers x D replicas on K*D ranks: rank ``r`` hosts peer ``r % K`` in replica ``r // K``.

    A *cohort* (ranks ``d*K .. d*K+K-1``) holds one replica of every peer; its ranks read the same batch
    (data shard ``d`` of ``D``) and all-gather their outputs every step. A *peer group* (ranks ``k``,
    ``K+k``, ...) holds the D replicas of peer ``k``; DDP all-reduces that peer's gradients in it only.
    Every rank must create every group, in the same order (``torch.distributed.new_group`` is collective).
    """

    def __init__(self, num_peers: int, rank: int, world_size: int):
        if world_size % num_peers:
            raise ValueError(f"{world_size} workers cannot hold {num_peers} peers x D replicas: "
                             f"use a multiple of {num_peers} workers")
        self.num_peers, self.replicas = num_peers, world_size // num_peers
        self.peer, self.replica = rank % num_peers, rank // num_peers
        self.cohort_group = self.peer_group = None
        if self.replicas > 1:
            for d in range(self.replicas):
                group = dist.new_group([d * num_peers + k for k in range(num_peers)])
                if d == self.replica:
                    self.cohort_group = group
            for k in range(num_peers):
                group = dist.new_group([d * num_peers + k for d in range(self.replicas)])
                if k == self.peer:
                    self.peer_group = group

    def gather(self, own: torch.Tensor) -> list[torch.Tensor]:
        """Every peer's tensor from this rank's cohort, in peer order."""
        return gather_peer_logits(own, self.cohort_group)

    def hand_term_group(self, module: nn.Module) -> None:
        """Give the knowledge terms of this rank's peer (in ``module``) the group they communicate in.

        Peer k's term towards peer j must see what it sees in one process with the global batch: the
        global batch is split over peer k's D replicas (data shard d each), so its terms gather in the
        peer group; the cohort group would mix in the other peers' embeddings (and the world both). With
        D = 1 this rank holds the whole batch: nothing to gather (``None``).
        """
        for term in module.modules():
            if isinstance(term, KnowledgeTerm):
                term.set_process_group(self.peer_group)


class ShardedTeacherEnsemble(nn.Module):
    """A multi-teacher ensemble whose teachers are spread over the data-parallel ranks.

    Gives exactly what :class:`~kdray.algorithms.schemes.multi_teacher.TeacherEnsemble` gives in one
    process (the same combination of the same logits, and every teacher's features in ``members`` for
    per-teacher feature terms), so students are unaffected by the sharding.

    ``teachers`` are :class:`~kdray.algorithms.distiller.Teacher` s (their feature points and class order
    set) or bare models; each rank keeps only those it hosts. Each teacher's output layout (logits and
    feature shapes) is learnt on the first call: every rank runs its teachers and the layouts are
    all-gathered once, so a rank hosting no teacher still knows what to receive. Every call then
    all-gathers the inputs and exchanges all teachers' logits and requested features for the global
    batch in one all-reduce of a flat buffer (each teacher's slice is filled by the rank hosting it).
    """

    def __init__(self, teachers: list[nn.Module], rank: int, world_size: int, rule: str = "mean",
                 weights: list[float] | None = None, seed: int = 0):
        super().__init__()
        if rule not in COMBINE_RULES:
            raise ValueError(f"unknown combine rule {rule!r}; allowed: {', '.join(COMBINE_RULES)}")
        self.num_teachers, self.rank, self.world_size = len(teachers), rank, world_size
        owners = teacher_ranks(len(teachers), world_size)
        self.local_ids = [m for m, r in enumerate(owners) if r == rank]
        self.local = nn.ModuleList([teachers[m] if isinstance(teachers[m], Teacher) else Teacher(teachers[m])
                                    for m in self.local_ids])  # the others are dropped here
        self.rule, self.weights = rule, weights
        self.generator = torch.Generator().manual_seed(seed)  # same on every rank: 'random' picks agree
        self.layouts: list[OutputLayout] | None = None  # learned on the first call

    def train(self, mode: bool = True):
        return super().train(False)

    def _learn_layouts(self, outs: dict[int, ModelOutput]) -> None:
        """Each teacher's :class:`OutputLayout`, gathered once from the ranks hosting them."""
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, {m: OutputLayout.of(out).describe() for m, out in outs.items()})
        described = {m: rows for part in gathered for m, rows in part.items()}
        self.layouts = [OutputLayout.from_description(described[m]) for m in range(self.num_teachers)]

    @torch.no_grad()
    def forward(self, inputs: torch.Tensor) -> ModelOutput:
        if not isinstance(inputs, torch.Tensor):  # a mapping (text): variable lengths per rank, not gathered yet
            raise ValueError("ensemble.shard: true gathers one input tensor per rank; inputs that are a mapping "
                             "(text) need ensemble.shard: false (each worker hosts every teacher)")
        comm = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
                else inputs.device)
        home = inputs.device
        inputs = inputs.to(comm)
        sizes = [torch.zeros(1, dtype=torch.long, device=comm) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([inputs.shape[0]], device=comm))
        sizes = [int(s) for s in sizes]
        padded = torch.zeros((max(sizes), *inputs.shape[1:]), dtype=inputs.dtype, device=comm)
        padded[: inputs.shape[0]] = inputs
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded)
        everything = torch.cat([g[:n] for g, n in zip(gathered, sizes)])
        outs = {}
        for m, teacher in zip(self.local_ids, self.local):
            device = next(teacher.parameters(), everything).device
            outs[m] = teacher(everything.to(device))
        if self.layouts is None:
            self._learn_layouts(outs)
        # One (global batch, sum of widths) buffer: teacher m's packed outputs in its column block, filled by
        # the rank hosting it (zeros elsewhere), so one all-reduce hands every rank every teacher's outputs.
        dtype = torch.float32
        for layout in self.layouts:
            for _name, _shape, d in layout.entries:
                dtype = torch.promote_types(dtype, d)
        starts = [sum(lay.width for lay in self.layouts[:m]) for m in range(self.num_teachers + 1)]
        flat = torch.zeros(everything.shape[0], starts[-1], dtype=dtype, device=comm)
        for m, out in outs.items():
            flat[:, starts[m]: starts[m + 1]] = self.layouts[m].pack(out, dtype).to(comm)
        dist.all_reduce(flat)
        first = sum(sizes[: self.rank])
        mine = flat[first: first + sizes[self.rank]].to(home)
        members = [lay.unpack(mine[:, starts[m]: starts[m + 1]]) for m, lay in enumerate(self.layouts)]
        return ensemble_output(members, self.rule, self.weights, self.generator)
