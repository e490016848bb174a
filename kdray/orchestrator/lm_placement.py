"""Placement for language-model distillation: sharded LM teachers, a DDP or FSDP2 student, and the sharded
student's checkpoint.

- Sharded LM teachers (:class:`ShardedLMTeachers`): teacher m lives on rank ``m % world`` (as the image
  :class:`~kdray.orchestrator.placement.ShardedTeacherEnsemble`). Each step the ranks all-gather their token
  ids, each rank runs its teachers on the *whole* global batch, and for every teacher its host scatters the
  per-token fp32 log-probabilities ``(rows, L, V)`` to the ranks that own those rows. Each rank then combines
  the M teachers for its own rows with :func:`kdray.algorithms.lm.multi_teacher.combine_teacher_logits`,
  exactly the call one process makes on the whole batch. The image ensemble all-reduces one buffer holding
  every teacher's outputs for the global batch; for an LM that buffer is ``M x B x L x V`` floats on every
  rank, so here each teacher's output is scattered instead: a rank receives only its own rows
  (``M x B/world x L x V``) and holds its own teachers' outputs for the global batch while it sends them.
  Log-probabilities rather than logits cross the wire: they are fp32 whatever the teacher's dtype (a bf16
  teacher is upcast once, on its host) and every combine rule gives the same distribution from them (logits
  and log-probs differ by a constant per position, which ``mean``, ``weights`` and ``confidence`` carry into
  the combination as a per-position constant that the softmax removes).
- Token means across ranks (:func:`global_token_scale`): a token loss is a mean over the *kept* tokens of a
  rank's rows; DDP and FSDP average gradients over ranks, which equals the one-process mean over all kept
  tokens only when every rank keeps the same number. Scaling each rank's loss by
  ``world * kept_here / kept_everywhere`` makes the averaged gradient the global token mean for any masks.
- Students bigger than one device (:func:`shard_student`): FSDP2 (``torch.distributed.fsdp.fully_shard``)
  on every transformer block and then the root, so parameters, gradients and optimizer state are split over
  the ranks and a block's parameters are all-gathered only while it runs. Ray's
  ``prepare_model(parallel_strategy="fsdp")`` is FSDP1; kdray calls ``fully_shard`` itself (and Ray's
  ``parallel_strategy=None``). The teachers are not sharded with the student: each is a plain module on its
  host rank, optionally in bf16 (``teacher_dtype``).
- Checkpoints of a sharded student (:func:`save_student_checkpoint`, :func:`load_student_checkpoint`): the
  full model and optimizer state dicts gathered on rank 0 (``torch.distributed.checkpoint.state_dict`` with
  ``full_state_dict`` and CPU offload), written there atomically (temp file + rename), read back on rank 0
  and handed to every rank, which keeps its shards of it (any world size). The file loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from kdray.algorithms.lm.generation import causal_logits
from kdray.algorithms.lm.multi_teacher import combine_teacher_logits
from kdray.algorithms.lm.vocabulary import lm_vocab_size
from kdray.orchestrator.placement import teacher_ranks
from kdray.orchestrator.run_dir import write_atomic

STUDENT_SHARDING = ("ddp", "fsdp")


def _world(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def gather_rows(local: torch.Tensor, group=None) -> tuple[torch.Tensor, list[int]]:
    """Every rank's rows of ``local`` concatenated in rank order, and each rank's row count (batches may differ
    in size; all other dims must agree, e.g. a packed sequence length)."""
    _, world = _world(group)
    sizes = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], device=local.device), group=group)
    counts = [int(s) for s in sizes]
    padded = local.new_zeros((max(counts), *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, counts)]), counts


class ShardedLMTeachers(nn.Module):
    """M LM teachers spread over the ranks; ``forward(input_ids)`` gives the combined per-token teacher logits
    (fp32 log-probabilities, ``(local rows, L, V)``) for this rank's rows, the same as
    ``combine_teacher_logits([log_softmax(teacher(ids)) for teacher in teachers], rule, weights)`` on the
    global batch in one process. See the module doc for what crosses between ranks.

    ``teachers``: all M models (each rank keeps only those it hosts: build them lazily where memory matters,
    only ``local_ids`` are used); ``teacher_dtype``: e.g. ``torch.bfloat16`` for the hosted copies.
    ``rule`` ``random`` draws from a generator seeded alike on every rank, so all ranks pick the same teacher.
    """

    def __init__(self, teachers: list[nn.Module], rank: int, world_size: int, rule: str = "mean",
                 weights: list[float] | None = None, teacher_dtype: torch.dtype | None = None,
                 student_vocab_size: int | None = None, seed: int = 0, group=None):
        super().__init__()
        if not teachers:
            raise ValueError("sharded LM teachers: need at least one teacher")
        self.num_teachers, self.rank, self.world_size, self.group = len(teachers), rank, world_size, group
        self.owners = teacher_ranks(len(teachers), world_size)
        self.local_ids = [m for m, r in enumerate(self.owners) if r == rank]
        hosted = []
        for m in self.local_ids:
            teacher = teachers[m].eval().requires_grad_(False)
            hosted.append(teacher.to(teacher_dtype) if teacher_dtype is not None else teacher)
        self.local = nn.ModuleList(hosted)
        self.rule, self.weights, self.student_vocab_size = rule, weights, student_vocab_size
        self.generator = torch.Generator().manual_seed(seed)
        self.vocab_sizes: list[int] | None = None  # learned on the first call from the ranks hosting them

    def _learn_vocab_sizes(self) -> None:
        """Each teacher's vocabulary size, all-gathered once, so a rank knows what it receives."""
        gathered: list = [None] * self.world_size
        own = {m: lm_vocab_size(t) for m, t in zip(self.local_ids, self.local)}
        dist.all_gather_object(gathered, own, group=self.group)
        found = {m: v for part in gathered for m, v in part.items()}
        self.vocab_sizes = [found[m] for m in range(self.num_teachers)]

    def train(self, mode: bool = True):
        return super().train(False)

    def _source(self, owner: int) -> int:
        return owner if self.group is None else dist.get_global_rank(self.group, owner)

    @torch.no_grad()
    def member_log_probs(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Each teacher's fp32 log-probs ``(local rows, L, V)`` for this rank's rows, in teacher order."""
        everything, counts = gather_rows(input_ids, self.group)
        starts = [sum(counts[:r]) for r in range(self.world_size + 1)]
        most = max(counts)
        members = []
        if self.vocab_sizes is None:
            self._learn_vocab_sizes()
        for m, owner in enumerate(self.owners):
            chunks = None
            if owner == self.rank:
                teacher = self.local[self.local_ids.index(m)]
                device = next(teacher.parameters()).device
                log_p = F.log_softmax(causal_logits(teacher, everything.to(device)).float(), dim=-1)
                log_p = log_p.to(input_ids.device)
                chunks = []
                for r in range(self.world_size):
                    chunk = log_p.new_zeros((most, *log_p.shape[1:]))
                    chunk[: counts[r]] = log_p[starts[r]: starts[r + 1]]
                    chunks.append(chunk)
            received = torch.empty((most, input_ids.shape[1], self.vocab_sizes[m]), dtype=torch.float32,
                                   device=input_ids.device)
            dist.scatter(received, chunks, src=self._source(owner), group=self.group)
            members.append(received[: counts[self.rank]])
        return members

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        members = self.member_log_probs(input_ids)
        return combine_teacher_logits(members, self.rule, self.weights, self.student_vocab_size, self.generator)[0]


def global_token_scale(mask: torch.Tensor, group=None) -> torch.Tensor:
    """``world * kept_here / kept_everywhere``: multiply a rank's token-mean loss by it so the gradient averaged
    over ranks (DDP, FSDP) is the mean over every rank's kept tokens, as in one process."""
    kept = mask.float().sum()
    total = kept.clone()
    dist.all_reduce(total, group=group)
    return dist.get_world_size(group) * kept / total.clamp_min(1.0)


def transformer_layers(model: nn.Module) -> list[nn.Module]:
    """The blocks FSDP shards one by one: the children of the model's largest ``nn.ModuleList`` (GPT-style
    ``blocks``, Llama's ``layers``, GPT-2's ``h``)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        return []
    largest = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    return list(largest)


def shard_student(model: nn.Module, param_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard ``model`` in place with FSDP2: each transformer block, then the root (embeddings, head).
    ``param_dtype`` (e.g. bf16) computes in that dtype with fp32 master weights and fp32 gradient reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for layer in transformer_layers(model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_student_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole student's state dict on rank 0 (CPU tensors; empty on other ranks). Collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True))


def save_student_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                            group=None) -> None:
    """Gather the sharded student's model and optimizer state on rank 0 and write them there atomically.
    Collective: every rank calls it; returns once the file is in place."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_options(cpu_offload=True))
    if dist.get_rank(group) == 0:
        payload = {"model": model_state, "optimizer": optim_state, "step": int(step)}
        write_atomic(path, lambda fh: torch.save(payload, fh), suffix=".pt")
    dist.barrier(group=group)


def load_student_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, group=None) -> int:
    """Read a :func:`save_student_checkpoint` file on rank 0, hand it to every rank and load it into that rank's
    shards of ``model`` and ``optimizer``; return the step it was written at. Collective.

    The whole payload crosses once as a pickled object (every rank briefly holds the full CPU state). torch's
    ``StateDictOptions(broadcast_from_rank0=True)``, which would stream it tensor by tensor, hung on 2 gloo CPU
    ranks with torch 2.14.1 (both ranks waiting in its ``broadcast_object_list``), so it is not used here."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    box = [torch.load(path, weights_only=True) if dist.get_rank(group) == 0 else None]
    dist.broadcast_object_list(box, src=0, group=group)
    payload = box[0]
    set_state_dict(model, optimizer, model_state_dict=payload["model"], optim_state_dict=payload["optimizer"],
                   options=_options())
    return int(payload["step"])
