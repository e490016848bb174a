"""Masked token-level distillation loss on ``(B, L, V)`` logits: the divergence per position, averaged over the
positions the loss mask keeps (completion tokens, not prompt or padding), in fp32, at a temperature.

The mask is aligned with the logits: position ``t`` of ``mask`` says whether the distributions at position
``t`` count. For next-token logits that is the *target* token's mask shifted by one
(:func:`next_token_mask`): ``logits[:, t]`` predicts ``input_ids[:, t + 1]``.

Reduction: the sum over kept positions divided by the number of kept positions (the token mean of TRL's
``batchmean`` with labels and of DistiLLM), times ``T^2`` so the gradient scale does not shrink with ``T``
(Hinton et al. 2015; MiniLLM and GKD train at ``T = 1`` where the factor is 1). A batch with no kept position
gives a zero loss that still reaches the student's graph. Teacher tensors are detached: no gradient ever
reaches the teacher.

Teacher "logits" may be log-probabilities (a combined multi-teacher distribution): ``softmax(log p / T)``
equals ``softmax(z / T)`` because the two differ by a constant per position.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdray.algorithms.lm.divergence import get_divergence


def next_token_mask(target_mask: torch.Tensor) -> torch.Tensor:
    """The mask aligned with ``logits[:, :-1]`` from a per-token mask of the targets (``target_mask[:, 1:]``)."""
    return target_mask[:, 1:]


def check_token_shapes(student_logits: torch.Tensor, teacher_shape: tuple[int, ...], mask: torch.Tensor,
                       where: str = "token loss") -> None:
    """One-line errors when the student's logits, the teacher's and the mask do not line up."""
    if student_logits.dim() != 3:
        raise ValueError(f"{where}: student logits must be (batch, length, vocab), got shape "
                         f"{tuple(student_logits.shape)}")
    if tuple(teacher_shape[:2]) != tuple(student_logits.shape[:2]):
        raise ValueError(f"{where}: teacher (batch, length) {tuple(teacher_shape[:2])} != student "
                         f"{tuple(student_logits.shape[:2])}; shift both logits the same way")
    if tuple(mask.shape) != tuple(student_logits.shape[:2]):
        raise ValueError(f"{where}: mask shape {tuple(mask.shape)} != logits' (batch, length) "
                         f"{tuple(student_logits.shape[:2])}; use next_token_mask(target_mask) for shifted logits")


def tempered_log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log_softmax(logits / T)`` over the last dim in fp32 (float64 stays float64)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return F.log_softmax(logits.to(dtype) / temperature, dim=-1)


def masked_token_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum(per_token * mask) / sum(mask)``; zero (with a graph) when the mask keeps nothing."""
    weights = mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp_min(1.0)


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, divergence: str = "forward_kl",
                     temperature: float = 1.0, **divergence_kwargs) -> torch.Tensor:
    """The divergence at every position, ``(B, L)``, unmasked and without the ``T^2`` factor."""
    fn = get_divergence(divergence)
    log_t = tempered_log_probs(teacher_logits.detach(), temperature)
    log_s = tempered_log_probs(student_logits, temperature)
    return fn(log_t, log_s, **divergence_kwargs)


def token_distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                       divergence: str = "forward_kl", temperature: float = 1.0,
                       **divergence_kwargs) -> torch.Tensor:
    """``T^2 * mean over kept positions of D(teacher_T, student_T)`` (full vocabulary, fp32)."""
    check_token_shapes(student_logits, tuple(teacher_logits.shape), mask)
    if teacher_logits.shape[-1] != student_logits.shape[-1]:
        raise ValueError(f"token loss: teacher vocabulary {teacher_logits.shape[-1]} != student vocabulary "
                         f"{student_logits.shape[-1]}; teachers must share the student's tokenizer")
    per_token = token_divergence(student_logits, teacher_logits, divergence, temperature, **divergence_kwargs)
    return masked_token_mean(per_token, mask) * temperature**2
