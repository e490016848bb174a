"""On-policy distillation (GKD, Agarwal et al. ICLR 2024): which tokens a step's loss is computed on.

Per batch, with probability ``lam`` (GKD's lambda, TRL's ``lmbda``) the completions are replaced by the
*student's* samples at ``temperature`` and the teacher scores them (on-policy: the student learns from its own
mistakes); otherwise, with ``seq_kd`` the *teacher* generates the completions (sequence-level KD, Kim & Rush
2016, the other end of the spectrum), and without it the corpus tokens are used (supervised KD). This is TRL's
GKDTrainer order: the student draw comes first, ``seq_kd`` applies only to the remaining batches. Both
distributions are then matched per token with any divergence of :mod:`kdray.algorithms.lm.divergence` (GKD
uses the generalized JSD); kdray keeps the divergence on seq-KD batches as TRL does, where Kim & Rush use
cross-entropy on the teacher's tokens.

The draws and the sampling use one seeded :class:`torch.Generator` owned by the source, so a run's sequence of
on-policy batches is reproducible and independent of the global RNG.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from kdray.algorithms.lm.generation import causal_logits, sample_completions
from kdray.algorithms.lm.token_loss import next_token_mask, token_distill_loss

SOURCES = ("student", "teacher", "corpus")


@dataclass
class LMBatch:
    """The tokens a step trains on and where they came from (one of :data:`SOURCES`)."""

    input_ids: torch.Tensor
    completion_mask: torch.Tensor
    source: str


class OnPolicySource:
    """Draws each batch's completions from the student (probability ``lam``), the teacher (``seq_kd``) or the
    corpus."""

    def __init__(self, lam: float = 0.5, seq_kd: bool = False, temperature: float = 1.0, seed: int = 0):
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"on-policy lam (GKD's lambda, the student-generated fraction) must be in [0, 1], "
                             f"got {lam}")
        self.lam, self.seq_kd, self.temperature = lam, seq_kd, temperature
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self, student: nn.Module, teacher: nn.Module, input_ids: torch.Tensor,
             completion_mask: torch.Tensor) -> LMBatch:
        on_policy = torch.rand((), generator=self.generator).item() < self.lam
        if on_policy or self.seq_kd:
            model = student if on_policy else teacher
            ids = sample_completions(model, input_ids, completion_mask, self.temperature, self.generator)
            return LMBatch(ids, completion_mask, "student" if on_policy else "teacher")
        return LMBatch(input_ids, completion_mask, "corpus")


def on_policy_distill_loss(student: nn.Module, teacher: nn.Module, input_ids: torch.Tensor,
                           completion_mask: torch.Tensor, source: OnPolicySource, divergence: str = "jsd",
                           temperature: float = 1.0, **divergence_kwargs) -> tuple[torch.Tensor, LMBatch]:
    """One step's token loss on the batch ``source`` draws; the teacher runs without grad on those tokens.

    ``completion_mask`` marks the completion tokens (targets); the loss compares the next-token distributions
    that predict them (:func:`kdray.algorithms.lm.token_loss.next_token_mask`).
    """
    batch = source.draw(student, teacher, input_ids, completion_mask)
    with torch.no_grad():
        teacher_logits = causal_logits(teacher, batch.input_ids)[:, :-1]
    student_logits = causal_logits(student, batch.input_ids)[:, :-1]
    loss = token_distill_loss(student_logits, teacher_logits, next_token_mask(batch.completion_mask), divergence,
                              temperature, **divergence_kwargs)
    return loss, batch
