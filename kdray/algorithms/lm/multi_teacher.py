"""Several LM teachers combined into one per-token teaching distribution.

The rules are the image multi-teacher scheme's (:func:`kdray.algorithms.schemes.multi_teacher.combine`),
applied with every token position as a "sample": ``mean`` (average logits, the normalised geometric mean of the
teachers' next-token distributions), ``weights`` (a fixed convex combination), ``confidence`` (per-token
weights ``softmax(-H(p_m))`` over teachers: at each position the teacher that is more certain counts more,
so a code teacher can lead on code tokens and a prose teacher on prose) and ``random`` (one teacher per step).
Combining logits rather than mixing probabilities keeps the result a set of logits, so the loss's temperature
applies to the combination exactly as to one teacher's logits. The combined logits are fp32 and go to any
token loss (full vocabulary, chunked, or :func:`kdray.algorithms.lm.topk.teacher_topk` for a top-k cache).

All teachers must share the student's tokenizer: the vocabularies are checked and a mismatch fails in one
line naming both sizes. Cross-tokenizer distillation (ULD, DSKD, token alignment) is out of scope.
"""
from __future__ import annotations

import torch

from kdray.algorithms.schemes.multi_teacher import combine


def check_vocabularies(teacher_logits: list[torch.Tensor], student_vocab_size: int | None = None) -> None:
    """One-line error when a teacher's vocabulary differs from the first teacher's or the student's."""
    if not teacher_logits:
        raise ValueError("multi-teacher LM distillation needs at least one teacher's logits")
    reference, what = (student_vocab_size, "the student's") if student_vocab_size is not None else (
        teacher_logits[0].shape[-1], "teacher 0's")
    for i, logits in enumerate(teacher_logits):
        if logits.shape[-1] != reference:
            raise ValueError(f"teacher {i} has a vocabulary of {logits.shape[-1]} tokens but {what} has "
                             f"{reference}: LM teachers must share the student's tokenizer (cross-tokenizer "
                             f"distillation is out of scope)")
        if logits.shape[:-1] != teacher_logits[0].shape[:-1]:
            raise ValueError(f"teacher {i} logits are {tuple(logits.shape)}, teacher 0's "
                             f"{tuple(teacher_logits[0].shape)}: all teachers must score the same tokens")


def combine_teacher_logits(teacher_logits: list[torch.Tensor], rule: str = "mean",
                           weights: list[float] | None = None, student_vocab_size: int | None = None,
                           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine M teachers' ``(B, L, V)`` logits per token: the ``(B, L, V)`` logits and ``(M,)`` weights
    (for ``confidence``, the mean of the per-token weights, for logging)."""
    check_vocabularies(teacher_logits, student_vocab_size)
    shape = teacher_logits[0].shape
    stacked = torch.stack([t.detach().reshape(-1, shape[-1]) for t in teacher_logits])   # (M, B * L, V)
    combined, per_teacher = combine(stacked, rule, weights, generator)
    return combined.reshape(shape), per_teacher
