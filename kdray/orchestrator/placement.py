"""Placement: which worker hosts which model, and which tensors cross between workers.

- Data-parallel students: every rank holds a replica of the distiller (DDP) and its own frozen teacher.
- Teacher-sharded multi-teacher (:class:`ShardedTeacherEnsemble`): teacher m lives on rank ``m % world``;
  each step the ranks all-gather their input batches, each runs its teachers on the whole gathered batch,
  and one all-reduce hands every rank all M teachers' logits (and the feature maps that per-teacher
  feature terms asked for) for its own rows. Memory per rank is ~M/world teachers; traffic per step is
  M x (global batch) x (classes + requested feature sizes) floats. Text batches (mappings of token ids and
  masks, each rank padded to its own length) are padded to the longest rank's length to be gathered, and each
  rank cuts its rows' outputs back to its own length (:class:`LengthLayout`).
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


#: What a mapping's tensors are padded with when a rank's batch is brought to the longest rank's length: 0, as
#: :func:`kdray.data.collate.collate_batch` pads every input key (BERT's ``[PAD]`` id, ``attention_mask`` 0), so
#: the gathered rows are what one batch of them would be.
INPUT_PAD = 0


def sequence_length(inputs) -> int:
    """The sequence length (dim 1) shared by a mapping's tensors of two or more dims; 0 for a tensor (images)
    or a mapping without such tensors. Keys of different lengths are a one-line :class:`ValueError`."""
    if isinstance(inputs, torch.Tensor):
        return 0
    lengths = {key: int(t.shape[1]) for key, t in inputs.items() if isinstance(t, torch.Tensor) and t.dim() >= 2}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"ensemble.shard: the input keys have different sequence lengths {lengths}; pad every key "
                         f"of a batch to one length (kdray.data.collate.collate_batch does)")
    return next(iter(lengths.values()), 0)


def _batch_rows(inputs) -> int:
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0])
    rows = {int(t.shape[0]) for t in inputs.values() if isinstance(t, torch.Tensor)}
    if len(rows) != 1:
        raise ValueError(f"ensemble.shard: the input mapping's tensors disagree on the batch size {sorted(rows)} "
                         f"(keys {', '.join(inputs)}); every key needs one row per sample")
    return rows.pop()


def _to_length(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """``tensor`` with dim 1 cut, or padded with :data:`INPUT_PAD`, to ``length``."""
    if tensor.shape[1] >= length:
        return tensor[:, :length]
    return torch.cat([tensor, tensor.new_full((tensor.shape[0], length - tensor.shape[1], *tensor.shape[2:]),
                                              INPUT_PAD)], 1)


def _gather_rows(tensor: torch.Tensor, sizes: list[int], length: int) -> torch.Tensor:
    """Every rank's rows of ``tensor`` in rank order; dim 1 first padded to ``length`` with :data:`INPUT_PAD`
    (``length`` 0: no sequence dim)."""
    if length and tensor.dim() >= 2:
        tensor = _to_length(tensor, length)
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)])


def gather_inputs(inputs, sizes: list[int], length: int, comm: torch.device):
    """The global batch: every rank's inputs (a tensor, or each tensor of a mapping brought to the longest
    rank's ``length``) concatenated in rank order on the ``comm`` device."""
    if isinstance(inputs, torch.Tensor):
        return _gather_rows(inputs.to(comm), sizes, 0)
    if length and "attention_mask" not in inputs:
        raise ValueError("ensemble.shard: true pads each worker's text batch to the longest worker's length, which "
                         "changes a teacher's outputs unless the inputs carry an attention_mask; add one to the "
                         "batch or set ensemble.shard: false")
    return {key: _gather_rows(t.to(comm), sizes, length) if isinstance(t, torch.Tensor) else t
            for key, t in inputs.items()}


class LengthLayout:
    """A teacher's :class:`OutputLayout` whose per-sample dims ``seq_dims[i]`` of entry ``i`` follow the input
    sequence length (hidden states ``(L, H)``: dim 0; attention maps ``(heads, L, L)``: dims 1 and 2; a
    masked-LM's logits ``(L, V)``: dim 0), so one description serves every step's length."""

    def __init__(self, layout: OutputLayout, seq_dims: list[tuple[int, ...]]):
        self.layout, self.seq_dims = layout, [tuple(d) for d in seq_dims]

    def at(self, length: int) -> OutputLayout:
        """The layout of this teacher's outputs for inputs of sequence ``length``."""
        if not any(self.seq_dims):
            return self.layout
        return OutputLayout([(name, tuple(length if d in dims else n for d, n in enumerate(shape)), dtype)
                             for (name, shape, dtype), dims in zip(self.layout.entries, self.seq_dims)])

    def cut(self, out: ModelOutput, length: int) -> ModelOutput:
        """``out`` (at a longer length) with every sequence dim cut back to ``length``."""
        if not any(self.seq_dims):
            return out
        tensors = {"logits": out.logits, **out.features}
        for (name, _shape, _dtype), dims in zip(self.layout.entries, self.seq_dims):
            for d in dims:
                tensors[name] = tensors[name].narrow(d + 1, 0, length)
        logits = tensors.pop("logits")
        return ModelOutput(logits, tensors)

    def describe(self):
        return self.layout.describe(), self.seq_dims

    @classmethod
    def from_description(cls, described) -> "LengthLayout":
        rows, seq_dims = described
        return cls(OutputLayout.from_description(rows), seq_dims)

    @classmethod
    def learn(cls, teacher: nn.Module, out: ModelOutput, inputs, length: int) -> "LengthLayout":
        """``out``'s layout (``teacher``'s output on ``inputs`` of sequence ``length``); for a mapping, the
        sequence dims are those that change when one row is run again at another length (a shape probe: a
        hidden size that happens to equal the length cannot be mistaken for it)."""
        layout = OutputLayout.of(out)
        if isinstance(inputs, torch.Tensor) or not length:
            return cls(layout, [()] * len(layout.entries))
        other = length - 1 if length > 1 else 2
        param = next(teacher.parameters(), None)
        row = {}  # one row at the other length (cut, or padded when the length is 1): only the shapes matter
        for key, v in inputs.items():
            if isinstance(v, torch.Tensor):
                v = v[:1].to(param.device if param is not None else v.device)
                v = _to_length(v, other) if v.dim() >= 2 else v
            row[key] = v
        probe = OutputLayout.of(teacher(row), [name for name, _, _ in layout.entries[1:]])
        seq_dims = []
        for (name, shape, _), (_, probed, _) in zip(layout.entries, probe.entries):
            dims = tuple(d for d, (a, b) in enumerate(zip(shape, probed)) if a != b)
            if any((shape[d], probed[d]) != (length, other) for d in dims) or len(shape) != len(probed):
                raise ValueError(f"ensemble.shard: teacher output {name!r} has shape {shape} at sequence length "
                                 f"{length} but {probed} at {other}; sharded teachers need outputs whose dims are "
                                 f"either fixed or the sequence length (use ensemble.shard: false)")
            seq_dims.append(dims)
        return cls(layout, seq_dims)


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

    Inputs that are a mapping (text: ``input_ids``, ``attention_mask``, ...) have each rank's own padded
    length. Each rank's tensors are padded to the longest rank's length with :data:`INPUT_PAD` (the collate
    function's pad, mask 0), the teachers run on that global batch, and each rank cuts its rows' outputs back
    to its own length along the dims that follow the sequence (hidden states, attention maps, Q/K/V; learnt
    once, :meth:`LengthLayout.learn`). Trailing positions whose mask is 0 receive no attention in a masked
    encoder, so the cut outputs are the unsharded ones up to float rounding (and pooled / [CLS] outputs have
    no sequence dim to cut). Traffic per step grows with the longest rank's length, not each rank's own.
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
        self.layouts: list[LengthLayout] | None = None  # learned on the first call

    def train(self, mode: bool = True):
        return super().train(False)

    def _learn_layouts(self, outs: dict[int, ModelOutput], everything, length: int) -> None:
        """Each teacher's :class:`LengthLayout`, learnt on its host and all-gathered once."""
        hosted = dict(zip(self.local_ids, self.local))
        own = {m: LengthLayout.learn(hosted[m], out, everything, length).describe() for m, out in outs.items()}
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, own)
        described = {m: rows for part in gathered for m, rows in part.items()}
        self.layouts = [LengthLayout.from_description(described[m]) for m in range(self.num_teachers)]

    @torch.no_grad()
    def forward(self, inputs) -> ModelOutput:
        tensors = [inputs] if isinstance(inputs, torch.Tensor) else [
            t for t in inputs.values() if isinstance(t, torch.Tensor)]
        home = tensors[0].device
        comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else home
        own = torch.tensor([_batch_rows(inputs), sequence_length(inputs)], device=comm)
        shapes = [torch.zeros(2, dtype=torch.long, device=comm) for _ in range(self.world_size)]
        dist.all_gather(shapes, own)
        sizes, lengths = [int(s[0]) for s in shapes], [int(s[1]) for s in shapes]
        length = max(lengths)
        everything = gather_inputs(inputs, sizes, length, comm)
        outs = {}
        for m, teacher in zip(self.local_ids, self.local):
            device = next(teacher.parameters(), tensors[0]).device
            outs[m] = teacher(everything.to(device) if isinstance(everything, torch.Tensor)
                              else {k: v.to(device) if isinstance(v, torch.Tensor) else v
                                    for k, v in everything.items()})
        if self.layouts is None:
            self._learn_layouts(outs, everything, length)
        layouts = [lay.at(length) for lay in self.layouts]
        # One (global batch, sum of widths) buffer: teacher m's packed outputs in its column block, filled by
        # the rank hosting it (zeros elsewhere), so one all-reduce hands every rank every teacher's outputs.
        dtype = torch.float32
        for layout in layouts:
            for _name, _shape, d in layout.entries:
                dtype = torch.promote_types(dtype, d)
        starts = [sum(lay.width for lay in layouts[:m]) for m in range(self.num_teachers + 1)]
        flat = torch.zeros(sum(sizes), starts[-1], dtype=dtype, device=comm)
        for m, out in outs.items():
            flat[:, starts[m]: starts[m + 1]] = layouts[m].pack(out, dtype).to(comm)
        dist.all_reduce(flat)
        first = sum(sizes[: self.rank])
        mine = flat[first: first + sizes[self.rank]].to(home)
        members = [self.layouts[m].cut(lay.unpack(mine[:, starts[m]: starts[m + 1]]), lengths[self.rank])
                   for m, lay in enumerate(layouts)]
        return ensemble_output(members, self.rule, self.weights, self.generator)
