"""Distillation over the teacher's top-k tokens per position, with the remaining mass kept as one explicit
"rest" bucket, so every divergence of :mod:`kdray.algorithms.lm.divergence` applies unchanged to k + 1 buckets.

How the rest bucket is formed (per position):

* teacher: its top-k log-probabilities at temperature ``T`` over the *full* vocabulary (what a cache stores),
  and ``rest = 1 - sum(top-k probabilities)``; the k + 1 teacher buckets are renormalised to sum to 1, a no-op
  up to rounding for live values that absorbs the float16 rounding of cached ones (a rest that rounds below 0
  is floored at the smallest fp32 number);
* student: its probabilities at the teacher's top-k indices (full-vocabulary softmax at ``T``, gathered), and
  ``rest = its total mass outside the teacher's top-k set``, computed exactly as a log-sum-exp over the
  complement, not as ``1 - sum``.

So the student is still pushed to move mass out of (or into) the tokens the teacher did not list, which a
loss renormalised over the top-k alone (TRL's ``top_k``, several on-policy-distillation forks) cannot do. Merging
buckets never increases an f-divergence, so every top-k loss is at most its full-vocabulary value; with
``k = V - 1`` the rest bucket is one token and with ``k = V`` there is no rest bucket: both equal the
full-vocabulary loss (tests/test_lm_topk.py). DistillKit and Megatron's offline logits store the same top-k
values; their treatment of the tail differs (dropped or renormalised).

The teacher's top-k is taken at one temperature; the rest mass at another temperature cannot be recovered
from top-k values, so a loss at a different temperature fails instead of silently mixing the two.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from kdray.algorithms.lm.chunked import chunked_masked_mean
from kdray.algorithms.lm.divergence import get_divergence
from kdray.algorithms.lm.token_loss import check_token_shapes, masked_token_mean, tempered_log_probs


@dataclass
class TeacherTopK:
    """A teacher's top-k per position: ``indices`` (B, L, k) int64 and ``logprobs`` (B, L, k) fp32, the log
    of the full-vocabulary softmax at ``temperature``; ``vocab_size`` is the teacher's V. ``rest_logprobs``
    (B, L, 1): the log of the mass outside the top-k, exact, when it was taken from the full logits; without it
    the rest bucket is ``1 - sum(top-k)``, which loses every digit in fp32 when the top-k holds nearly all the
    mass (a rest of 1e-8 reads as 0), what a reverse KL charges the student for."""

    indices: torch.Tensor
    logprobs: torch.Tensor
    temperature: float
    vocab_size: int
    rest_logprobs: torch.Tensor | None = None

    @property
    def k(self) -> int:
        return self.indices.shape[-1]


def teacher_topk(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0,
                 value_dtype: torch.dtype | None = None, exact_rest: bool = False) -> TeacherTopK:
    """The teacher's top-k log-probabilities at ``temperature``; ``value_dtype=torch.float16`` rounds them as
    the Parquet cache stores them (so live and cached training see the same numbers); ``exact_rest`` keeps the
    exact log-mass outside the top-k (``rest_logprobs``) instead of leaving it to ``1 - sum(top-k)``."""
    vocab_size = teacher_logits.shape[-1]
    if not 1 <= k <= vocab_size:
        raise ValueError(f"top-k k must be in [1, vocabulary size {vocab_size}], got {k}")
    with torch.no_grad():
        log_p = tempered_log_probs(teacher_logits, temperature)
        logprobs, indices = log_p.topk(k, dim=-1)
        rest = (log_p.scatter(-1, indices, float("-inf")).logsumexp(-1, keepdim=True)
                if exact_rest and k < vocab_size else None)
        if value_dtype is not None:
            logprobs = logprobs.to(value_dtype).float()
    return TeacherTopK(indices=indices, logprobs=logprobs, temperature=float(temperature), vocab_size=vocab_size,
                       rest_logprobs=rest)


def _log_rest(logprobs: torch.Tensor) -> torch.Tensor:
    """``log(1 - sum exp(logprobs))`` over the last dim, floored at the smallest positive fp32."""
    rest = -torch.expm1(logprobs.logsumexp(-1, keepdim=True))
    return rest.clamp_min(torch.finfo(torch.float32).tiny).log()


def topk_buckets(student_logits: torch.Tensor, indices: torch.Tensor, teacher_logprobs: torch.Tensor,
                 temperature: float, teacher_rest: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student log-probs over the k top-k buckets plus the rest bucket (none when k = V); the
    teacher's rest is ``teacher_rest`` when known exactly, else ``1 - sum(top-k)``."""
    log_s = tempered_log_probs(student_logits, temperature)
    student_top = log_s.gather(-1, indices)
    teacher_top = teacher_logprobs.to(log_s.dtype)
    if indices.shape[-1] == log_s.shape[-1]:
        return teacher_top - teacher_top.logsumexp(-1, keepdim=True), student_top
    outside = log_s.scatter(-1, indices, float("-inf"))
    student_rest = outside.logsumexp(-1, keepdim=True)
    rest = _log_rest(teacher_top) if teacher_rest is None else teacher_rest.to(log_s.dtype)
    teacher = torch.cat([teacher_top, rest], dim=-1)
    teacher = teacher - teacher.logsumexp(-1, keepdim=True)
    return teacher, torch.cat([student_top, student_rest], dim=-1)


def _check(student: torch.Tensor, topk: TeacherTopK, temperature: float | None, vocab_size: int) -> float:
    if vocab_size != topk.vocab_size:
        raise ValueError(f"top-k loss: teacher vocabulary {topk.vocab_size} != student vocabulary {vocab_size}; "
                         f"teachers must share the student's tokenizer")
    if temperature is not None and float(temperature) != topk.temperature:
        raise ValueError(f"top-k loss: the teacher's top-k was taken at temperature {topk.temperature} but the "
                         f"loss asks for {temperature}; take (or re-cache) the top-k at {temperature}, the rest "
                         f"mass at another temperature is not recoverable from top-k values")
    return topk.temperature


def topk_distill_loss(student_logits: torch.Tensor, topk: TeacherTopK, mask: torch.Tensor,
                      divergence: str = "forward_kl", temperature: float | None = None,
                      **divergence_kwargs) -> torch.Tensor:
    """``T^2 * mean over kept positions of D`` over the k + 1 buckets (``T`` is the top-k's temperature)."""
    check_token_shapes(student_logits, tuple(topk.indices.shape), mask, where="top-k loss")
    T = _check(student_logits, topk, temperature, student_logits.shape[-1])
    log_t, log_s = topk_buckets(student_logits, topk.indices, topk.logprobs, T, topk.rest_logprobs)
    per_token = get_divergence(divergence)(log_t, log_s, **divergence_kwargs)
    return masked_token_mean(per_token, mask) * T**2


def chunked_topk_distill_loss(student: torch.Tensor, topk: TeacherTopK, mask: torch.Tensor,
                              divergence: str = "forward_kl", temperature: float | None = None,
                              chunk_size: int = 128, student_head: nn.Module | None = None,
                              **divergence_kwargs) -> torch.Tensor:
    """:func:`topk_distill_loss` a chunk of positions at a time (see :mod:`kdray.algorithms.lm.chunked`);
    ``student`` is logits, or last hidden states when ``student_head`` is given."""
    check_token_shapes(student, tuple(topk.indices.shape), mask, where="chunked top-k loss")
    vocab_size = student.shape[-1] if student_head is None else getattr(student_head, "out_features", topk.vocab_size)
    T = _check(student, topk, temperature, vocab_size)
    fn = get_divergence(divergence)

    def per_token(student_chunk, indices, logprobs, *rest):
        logits = student_chunk if student_head is None else student_head(student_chunk)
        return fn(*topk_buckets(logits, indices, logprobs, T, rest[0] if rest else None), **divergence_kwargs)

    tensors = (student, topk.indices, topk.logprobs) + (() if topk.rest_logprobs is None else (topk.rest_logprobs,))
    return chunked_masked_mean(per_token, tensors, mask, chunk_size) * T**2
