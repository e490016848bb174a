"""The token loss computed a chunk of positions at a time, so memory stays bounded for large vocabularies.

A ``(B, L, V)`` fp32 logits tensor is the largest thing in an LM distillation step (B = 8, L = 2048, V = 128k:
8 GiB, and autograd keeps the log-softmax of student and teacher as well). Here the sequence is cut into
chunks of ``chunk_size`` positions; each chunk's masked loss sum runs under
:func:`torch.utils.checkpoint.checkpoint` (non-reentrant), so autograd keeps only the chunk's *inputs*
and recomputes the chunk's logits, softmaxes and divergence during backward. Given the last hidden states
and the LM heads instead of logits, the full logits never exist at all: peak memory is one chunk's
``B * chunk_size * V`` (Liger's fused linear + loss and TRL's chunked GKD make the same trade, one more
forward of the head per chunk).

The result is the same mean over kept positions as :func:`kdray.algorithms.lm.token_loss.token_distill_loss`
(sum over chunks, divided by the number of kept positions once), so values and gradients equal the
unchunked ones up to float summation order (tests/test_lm_chunked.py).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from kdray.algorithms.lm.token_loss import check_token_shapes, token_divergence

PerTokenLoss = Callable[..., torch.Tensor]


def chunked_masked_mean(per_token: PerTokenLoss, sequences: tuple[torch.Tensor, ...], mask: torch.Tensor,
                        chunk_size: int) -> torch.Tensor:
    """``sum_t per_token(...)[t] * mask[t] / sum(mask)`` with each chunk of positions checkpointed.

    ``sequences`` are sliced along dim 1 (positions) and passed to ``per_token``, which returns the loss per
    position of its chunk, ``(B, chunk)``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 position, got {chunk_size}")
    weights = mask.float()

    def chunk_sum(chunk_weights: torch.Tensor, *chunks: torch.Tensor) -> torch.Tensor:
        values = per_token(*chunks)
        return (values * chunk_weights.to(values.dtype)).sum()

    total = None
    for start in range(0, mask.shape[1], chunk_size):
        piece = slice(start, start + chunk_size)
        chunk_weights = weights[:, piece]
        if not chunk_weights.any():
            continue
        part = checkpoint(chunk_sum, chunk_weights, *(t[:, piece] for t in sequences), use_reentrant=False)
        total = part if total is None else total + part
    if total is None:   # nothing kept: a zero that still belongs to the student's graph
        return sum((t.sum() * 0.0 for t in sequences if t.requires_grad), weights.new_zeros(()))
    return total / weights.sum()


def chunked_token_distill_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
                               divergence: str = "forward_kl", temperature: float = 1.0, chunk_size: int = 128,
                               student_head: nn.Module | None = None, teacher_head: nn.Module | None = None,
                               **divergence_kwargs) -> torch.Tensor:
    """:func:`token_distill_loss` over chunks of ``chunk_size`` positions.

    ``student`` / ``teacher`` are logits ``(B, L, V)``, or last hidden states ``(B, L, H)`` when the
    matching ``*_head`` (the LM head, hidden -> vocabulary) is given; the teacher head runs without grad.
    """
    check_token_shapes(student, tuple(teacher.shape), mask, where="chunked token loss")

    def per_token(student_chunk: torch.Tensor, teacher_chunk: torch.Tensor) -> torch.Tensor:
        student_logits = student_chunk if student_head is None else student_head(student_chunk)
        if teacher_head is None:
            teacher_logits = teacher_chunk
        else:
            with torch.no_grad():
                teacher_logits = teacher_head(teacher_chunk)
        if teacher_logits.shape[-1] != student_logits.shape[-1]:
            raise ValueError(f"chunked token loss: teacher vocabulary {teacher_logits.shape[-1]} != student "
                             f"vocabulary {student_logits.shape[-1]}; teachers must share the student's tokenizer")
        return token_divergence(student_logits, teacher_logits, divergence, temperature, **divergence_kwargs)

    return chunked_masked_mean(per_token, (student, teacher.detach()), mask, chunk_size) * temperature**2
