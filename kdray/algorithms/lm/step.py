"""One language-model distillation step as named losses, and the held-out figures an LM stage reports.

This is the LM counterpart of the image distiller's step: every piece of :mod:`kdray.algorithms.lm` chosen by
one settings object (:class:`LMLossSettings`, what the ``lm:`` config section will hold), so a scheme's
runner, a Ray Train worker and a unit test all run the same code. The order inside a step:

1. the tokens: the corpus batch, or what :class:`~kdray.algorithms.lm.on_policy.OnPolicySource` draws
   (student samples with probability lambda, teacher samples with ``seq_kd``);
2. the teaching distribution: each teacher's next-token logits without grad, combined per token by
   :func:`~kdray.algorithms.lm.multi_teacher.combine_teacher_logits` when there are several, or a
   :class:`~kdray.algorithms.lm.topk.TeacherTopK` read from a cache (no teacher in memory);
3. the loss over the completion tokens (``next_token_mask``): cross-entropy on the corpus tokens
   (``loss: ce``, the scratch baseline and the teacher's own training), the full-vocabulary divergence, or
   the top-k divergence with its rest bucket; chunked over positions when ``chunk_tokens`` is set.

The result is ``{"lm_<loss>": tensor}`` (one term; the caller backwards the sum, as for image terms) and the
batch's source, so a caller can log which tokens fed the step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.algorithms.lm.chunked import chunked_token_distill_loss
from kdray.algorithms.lm.divergence import DIVERGENCES
from kdray.algorithms.lm.generation import causal_logits
from kdray.algorithms.lm.multi_teacher import combine_teacher_logits
from kdray.algorithms.lm.on_policy import LMBatch, OnPolicySource
from kdray.algorithms.lm.token_loss import masked_token_mean, next_token_mask, token_distill_loss
from kdray.algorithms.lm.topk import TeacherTopK, chunked_topk_distill_loss, teacher_topk, topk_distill_loss

LOSSES = ("ce", *DIVERGENCES)


@dataclass(frozen=True)
class LMLossSettings:
    """What one step computes. ``loss``: ``ce`` or a divergence of :mod:`kdray.algorithms.lm.divergence`;
    ``beta`` is GKD's (``jsd`` only; TRL's ends: 0 forward KL, 1 reverse KL), ``skew_alpha`` DistiLLM's
    (``skew_kl`` / ``skew_reverse_kl``); ``top_k`` None = the full vocabulary; ``chunk_tokens`` None = no
    chunking; ``combine`` / ``weights``: how several teachers are combined per token."""

    loss: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    skew_alpha: float = 0.1
    top_k: int | None = None
    chunk_tokens: int | None = None
    combine: str = "mean"
    weights: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"unknown LM loss {self.loss!r}; known: {', '.join(LOSSES)}")
        if self.temperature <= 0:
            raise ValueError(f"LM loss temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"LM top_k must be >= 1 or null (the full vocabulary), got {self.top_k}")
        if self.chunk_tokens is not None and self.chunk_tokens < 1:
            raise ValueError(f"LM chunk_tokens must be >= 1 or null (no chunking), got {self.chunk_tokens}")

    def divergence_kwargs(self) -> dict:
        if self.loss == "jsd":
            return {"beta": self.beta}
        if self.loss.startswith("skew_"):
            return {"alpha": self.skew_alpha}
        return {}


def masked_cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32) over the kept positions of ``(B, L, V)`` logits."""
    per_token = F.cross_entropy(student_logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return masked_token_mean(per_token.view_as(targets), mask)


@torch.no_grad()
def teaching_logits(teachers: list[nn.Module], input_ids: torch.Tensor, settings: LMLossSettings,
                    student_vocab_size: int) -> torch.Tensor:
    """The teachers' next-token logits for ``input_ids[:, :-1]``, combined per token when there are several."""
    logits = [causal_logits(t, input_ids)[:, :-1].float() for t in teachers]
    if len(logits) == 1:
        if logits[0].shape[-1] != student_vocab_size:
            raise ValueError(f"LM teacher vocabulary {logits[0].shape[-1]} != student vocabulary "
                             f"{student_vocab_size}; teachers must share the student's tokenizer")
        return logits[0]
    combined, _ = combine_teacher_logits(logits, settings.combine, list(settings.weights or []) or None,
                                         student_vocab_size)
    return combined


def lm_step_losses(student: nn.Module, input_ids: torch.Tensor, completion_mask: torch.Tensor,
                   settings: LMLossSettings, teachers: list[nn.Module] = (), cached_topk: TeacherTopK | None = None,
                   source: OnPolicySource | None = None) -> tuple[dict[str, torch.Tensor], LMBatch]:
    """The step's named loss and the batch it was computed on.

    ``completion_mask`` (B, L) marks the target tokens; ``cached_topk`` (positions ``[:, :-1]``) replaces the
    teachers (a top-k cache); ``source`` draws on-policy / seq-KD tokens (needs live teachers: a cache holds
    only the corpus tokens' top-k)."""
    if settings.loss != "ce" and not teachers and cached_topk is None:
        raise ValueError(f"LM loss {settings.loss!r} needs a teacher or a top-k cache; use loss 'ce' to train "
                         "from the tokens alone")
    if source is not None and cached_topk is not None:
        raise ValueError("on-policy or seq-KD batches need the teacher live: a top-k cache holds the corpus "
                         "tokens only; set lm.on_policy_lambda: 0 and lm.seq_kd: false, or drop the cache")
    if source is not None and source.seq_kd and len(teachers) != 1:
        raise ValueError(f"seq_kd generates with one teacher, got {len(teachers)}; combine several teachers "
                         "with on-policy student samples instead")
    batch = (source.draw(student, teachers[0] if teachers else None, input_ids, completion_mask)
             if source is not None else LMBatch(input_ids, completion_mask, "corpus"))
    student_logits = causal_logits(student, batch.input_ids)[:, :-1]
    mask = next_token_mask(batch.completion_mask)
    if settings.loss == "ce":
        return {"lm_ce": masked_cross_entropy(student_logits, batch.input_ids[:, 1:], mask)}, batch
    kwargs = settings.divergence_kwargs()
    T, chunk = settings.temperature, settings.chunk_tokens
    if cached_topk is None and settings.top_k is None:
        teacher_logits = teaching_logits(list(teachers), batch.input_ids, settings, student_logits.shape[-1])
        loss = (token_distill_loss(student_logits, teacher_logits, mask, settings.loss, T, **kwargs) if chunk is None
                else chunked_token_distill_loss(student_logits, teacher_logits, mask, settings.loss, T, chunk,
                                                **kwargs))
    else:
        topk = cached_topk
        if topk is None:
            teacher_logits = teaching_logits(list(teachers), batch.input_ids, settings, student_logits.shape[-1])
            topk = teacher_topk(teacher_logits, settings.top_k, T)
        loss = (topk_distill_loss(student_logits, topk, mask, settings.loss, **kwargs) if chunk is None
                else chunked_topk_distill_loss(student_logits, topk, mask, settings.loss, chunk_size=chunk, **kwargs))
    return {f"lm_{settings.loss}": loss}, batch


@torch.no_grad()
def held_out_figures(model: nn.Module, input_ids: torch.Tensor, completion_mask: torch.Tensor,
                     teacher: nn.Module | None = None, chunk_rows: int = 64) -> dict[str, float]:
    """A stage's held-out report over the kept target tokens: ``perplexity`` (exp of the mean next-token
    cross-entropy on the true tokens), ``top1`` (next-token accuracy) and, with a teacher,
    ``perplexity_under_teacher`` = exp(mean_t H(p_teacher, p_model)) (its floor is the teacher's entropy).
    Rows go through the models ``chunk_rows`` at a time (sums over tokens, so the figures are one pass's):
    a held-out split's full ``(N, L, V)`` logits would not fit for a large vocabulary."""
    if chunk_rows < 1:
        raise ValueError(f"held-out figures: chunk_rows must be >= 1, got {chunk_rows}")
    was_training = model.training
    model.eval()
    sums = {"perplexity": 0.0, "top1": 0.0, "perplexity_under_teacher": 0.0}
    tokens = 0
    try:
        for start in range(0, len(input_ids), chunk_rows):
            ids, kept = input_ids[start:start + chunk_rows], completion_mask[start:start + chunk_rows]
            logits = causal_logits(model, ids)[:, :-1].float()
            targets, keep = ids[:, 1:], next_token_mask(kept).bool()
            per_token = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
            sums["perplexity"] += per_token[keep].sum().item()
            sums["top1"] += (logits.argmax(-1)[keep] == targets[keep]).sum().item()
            if teacher is not None:
                p_teacher = causal_logits(teacher, ids)[:, :-1].float().softmax(-1)
                cross = -(p_teacher * logits.log_softmax(-1)).sum(-1)
                sums["perplexity_under_teacher"] += cross[keep].sum().item()
            tokens += int(keep.sum())
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("held-out figures: no target tokens (every position is prompt or padding)")
    figures = {"perplexity": math.exp(sums["perplexity"] / tokens), "top1": sums["top1"] / tokens}
    if teacher is not None:
        figures["perplexity_under_teacher"] = math.exp(sums["perplexity_under_teacher"] / tokens)
    return figures
