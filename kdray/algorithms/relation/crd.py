"""Tian, Krishnan & Isola, "Contrastive Representation Distillation" (ICLR 2020)."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method
from kdray.algorithms.relation.sp import paired_features


class Embed(nn.Module):
    """``g``: a linear projection followed by L2 normalisation (the paper's embedding heads)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.flatten(1)), p=2, dim=1)


def _all_gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate ``x`` (rows) from every rank of ``group``, tolerating different row counts; identity when
    ``group`` is ``None`` (nothing to gather) or has one rank."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    world = dist.get_world_size(group)
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    top = int(max(s.item() for s in sizes))
    padded = x.new_zeros((top, *x.shape[1:]))
    padded[: x.shape[0]] = x
    chunks = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(chunks, padded.contiguous(), group=group)
    return torch.cat([c[: int(s.item())] for c, s in zip(chunks, sizes)])


@register_method
class CRD(KnowledgeTerm):
    """Contrastive Representation Distillation: NCE between student and teacher embeddings.

    Both penultimate embeddings go through a trainable head ``g`` (linear to ``feat_dim`` + L2 norm).
    For each sample ``i`` of the batch (its dataset index is ``batch.indices[i]``) the positive is the
    other model's memory-bank entry of ``i`` and ``nce_k`` negatives are bank entries drawn uniformly from
    the training set. With the critic ``h = P / (P + K/M)`` (``M = num_samples``, uniform noise) and
    ``P = exp(<a, m>/tau) / Z``, the loss per anchor is NCE's
    ``-log h(pos) - sum_neg log(1 - h(neg))`` (Eq. 18-19), averaged over the batch, computed
    symmetrically: teacher embeddings against the student bank and student embeddings against the
    teacher bank, summed. Banks are then updated for the batch's indices with momentum ``m``:
    ``bank[i] = normalise(m * bank[i] + (1 - m) * embedding_i)``. Banks and ``Z`` are buffers, so they
    are checkpointed with the term. The banks and ``Z`` must cover the whole batch the one-process run
    would see: when that batch is split over ranks, the orchestrator hands the term the process group of
    those ranks (:meth:`set_process_group`; offline data-parallel: the world; peer-parallel online: the
    peer's replicas, never the cohort, whose ranks hold other peers' embeddings), the updates are
    all-gathered in it and ``Z`` is estimated over it, so every rank of it keeps identical banks.
    Without a group (one process) nothing is communicated.

    Paper vs. code: Eq. 19 is printed with the raw ``exp(<a, m>/tau)``; the authors' code (RepDistiller)
    divides it by a partition-function estimate ``Z = M * mean(exp(<a, m>/tau))`` taken on the first
    batch and then frozen (Wu et al. 2018's NCE). The published weight and temperature were tuned with
    that constant and without it ``exp(1/0.07)`` dwarfs ``K/M``, so we keep it. RepDistiller's CIFAR
    loader draws negatives from other classes ("exact" mode); here they are uniform over the dataset
    (its "relax" mode). ``sample_negatives`` is the single place negatives are drawn; tests replace it.

    Published CIFAR-100 defaults (RepDistiller): ``weight = 0.8``, ``feat_dim = 128``,
    ``nce_k = 16384`` (clipped to ``num_samples - 1``), ``temperature = 0.07``, ``momentum = 0.5``.
    Feature point: the penultimate embedding.
    """

    name = "crd"
    kind = "relation"
    paper = "Tian, Krishnan & Isola 2020, Contrastive Representation Distillation (ICLR)"
    default_student_points = "embedding"
    default_teacher_points = "embedding"

    def __init__(self, weight: float = 0.8, feat_dim: int = 128, nce_k: int = 16384, temperature: float = 0.07,
                 momentum: float = 0.5, eps: float = 1e-7):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"crd.temperature must be > 0, got {temperature}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"crd.momentum must be in [0, 1), got {momentum}")
        if nce_k < 1:
            raise ValueError(f"crd.nce_k must be >= 1, got {nce_k}")
        self.weight = weight
        self.feat_dim = feat_dim
        self.nce_k = nce_k
        self.temperature = temperature
        self.momentum = momentum
        self.eps = eps
        self.num_samples = 0
        self.embed_s: Embed | None = None
        self.embed_t: Embed | None = None
        self.process_group = None

    def set_process_group(self, group) -> None:
        """Gather bank updates and estimate ``Z`` in ``group`` (see the class notes); ``None``: locally."""
        self.process_group = group

    def build(self, student: ModelOutput, teacher: ModelOutput, num_samples: int) -> None:
        if num_samples < 2:
            raise ValueError(f"crd needs the training-set size (num_samples >= 2) for its memory banks, "
                             f"got {num_samples}")
        (f_s, f_t), = paired_features(self, student, teacher)[-1:]
        self.num_samples = num_samples
        self.nce_k = min(self.nce_k, num_samples - 1)
        # heads and banks follow each side's features (device and dtype: a float64 model gets float64 banks)
        like_s, like_t = dict(device=f_s.device, dtype=f_s.dtype), dict(device=f_t.device, dtype=f_t.dtype)
        self.embed_s = Embed(f_s.flatten(1).shape[1], self.feat_dim).to(**like_s)
        self.embed_t = Embed(f_t.flatten(1).shape[1], self.feat_dim).to(**like_t)
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)
        # bank_s holds student embeddings (contrasted with the teacher anchor), bank_t the teacher's.
        self.register_buffer("bank_s", (torch.rand(num_samples, self.feat_dim, **like_s) * 2 - 1) * stdv)
        self.register_buffer("bank_t", (torch.rand(num_samples, self.feat_dim, **like_t) * 2 - 1) * stdv)
        # Z for (student anchor vs. teacher bank, teacher anchor vs. student bank); < 0 means "not set yet".
        self.register_buffer("z", torch.full((2,), -1.0, **like_s))

    def sample_negatives(self, positives: torch.Tensor) -> torch.Tensor:
        """``(B, nce_k)`` bank indices drawn uniformly from ``[0, num_samples)`` (may include the positive)."""
        return torch.randint(0, self.num_samples, (positives.shape[0], self.nce_k), device=positives.device)

    def nce_loss(self, probs: torch.Tensor) -> torch.Tensor:
        """NCE with uniform noise: ``probs[:, 0]`` is the positive's ``P``, the rest the negatives'."""
        k = probs.shape[1] - 1
        noise = k / self.num_samples
        log_h_pos = torch.log(probs[:, 0] / (probs[:, 0] + noise + self.eps))
        log_1m_h_neg = torch.log(noise / (probs[:, 1:] + noise + self.eps))
        return -(log_h_pos + log_1m_h_neg.sum(1)).mean()

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        if self.embed_s is None:
            raise RuntimeError("crd must be built (Distiller.build) before use")
        (f_s, f_t), = paired_features(self, student, teacher)[-1:]
        v_s, v_t = self.embed_s(f_s), self.embed_t(f_t)
        pos = batch.indices.to(v_s.device).long()
        idx = torch.cat([pos[:, None], self.sample_negatives(pos).to(pos.device)], dim=1)  # (B, 1 + K)

        bank_s = self.bank_s[idx].detach()  # (B, 1 + K, D)
        bank_t = self.bank_t[idx].detach()
        exp_t = torch.exp(torch.bmm(bank_s, v_t[:, :, None]).squeeze(2) / self.temperature)  # teacher anchor
        exp_s = torch.exp(torch.bmm(bank_t, v_s[:, :, None]).squeeze(2) / self.temperature)  # student anchor
        z = self.z
        if bool((z < 0).any()):  # first batch: estimate Z (frozen from then on once training)
            with torch.no_grad():
                # sums and row count over the group's ranks: the mean over the whole (split) batch
                totals = torch.stack([exp_s.sum(), exp_t.sum(), exp_s.new_tensor(float(exp_s.numel()))])
                if self.training and self.process_group is not None:
                    dist.all_reduce(totals, group=self.process_group)
                estimate = totals[:2] / totals[2] * self.num_samples
                z = torch.where(z < 0, estimate, z)
                if self.training:
                    self.z.copy_(z)
        loss = self.nce_loss(exp_s / z[0]) + self.nce_loss(exp_t / z[1])

        if self.training:
            self._update_banks(pos, v_s.detach(), v_t.detach())
        return {"crd": self.weight * loss}

    @torch.no_grad()
    def _update_banks(self, pos: torch.Tensor, v_s: torch.Tensor, v_t: torch.Tensor) -> None:
        group = self.process_group
        pos, v_s, v_t = _all_gather_rows(pos, group), _all_gather_rows(v_s, group), _all_gather_rows(v_t, group)
        m = self.momentum
        self.bank_s.index_copy_(0, pos, F.normalize(self.bank_s[pos] * m + v_s * (1 - m), p=2, dim=1))
        self.bank_t.index_copy_(0, pos, F.normalize(self.bank_t[pos] * m + v_t * (1 - m), p=2, dim=1))
