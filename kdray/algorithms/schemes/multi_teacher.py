"""Multi-teacher distillation: M frozen teachers combined into one teaching signal.

Combination rules (the survey's multi-teacher section, Sec. 4.2):
- ``mean``: the average of the teachers' logits (You et al., KDD 2017 average the soft targets; averaging
  logits is the normalised geometric mean of their distributions and keeps the knowledge terms unchanged);
- ``weights``: a fixed convex combination (weights normalised to sum 1);
- ``confidence``: per-sample weights ``softmax(-H(p_m))`` over teachers, so the teacher that is more
  certain about a sample (lower entropy) counts more (in the spirit of CA-MKD, Zhang et al. 2022, which
  weights by the teacher's cross-entropy; entropy needs no labels);
- ``random``: one teacher per step, drawn uniformly (Fukuda et al., Interspeech 2017).

Feature-level multi-teacher: a feature or relation term is instantiated once per teacher (each builds its
own connector from its teacher's feature shapes) and the per-teacher losses are combined by the same rule
(:func:`combine`'s per-teacher weights); response terms see the combined logits. See ``Distiller``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.algorithms.base import ModelOutput
from kdray.algorithms.precision import full_precision

COMBINE_RULES = ("mean", "weights", "confidence", "random")


def combine(stacked: torch.Tensor, rule: str = "mean", weights: list[float] | None = None,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine teacher logits ``stacked`` (M, B, C) by ``rule``: the (B, C) logits, and (M,) per-teacher
    weights (summing to 1) for losses that are computed per teacher (feature terms, one connector each).

    The per-teacher weights follow the same rule: 1/M for ``mean``; the normalised fixed weights for
    ``weights``; for ``confidence`` the batch mean of the per-sample entropy weights (a feature loss is
    one number per batch, so the per-sample weights are averaged); for ``random`` one-hot on the teacher
    drawn for this step (the same draw picks the logits). bf16 / fp16 logits (a teacher under autocast) are
    combined in fp32.
    """
    stacked = full_precision(stacked)
    m = stacked.shape[0]
    if rule == "mean":
        return stacked.mean(0), torch.full((m,), 1.0 / m, dtype=stacked.dtype, device=stacked.device)
    if rule == "weights":
        if weights is None or len(weights) != m:
            raise ValueError(f"combine 'weights' needs {m} weights, got {weights}")
        w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"teacher weights must be >= 0 with a positive sum, got {weights}")
        w = w / w.sum()
        return torch.einsum("m,mbc->bc", w, stacked), w
    if rule == "confidence":
        log_p = F.log_softmax(stacked, dim=2)
        entropy = -(log_p.exp() * log_p).sum(2)  # (M, B)
        w = torch.softmax(-entropy, dim=0)  # over teachers, per sample
        return (w.unsqueeze(2) * stacked).sum(0), w.mean(1)
    if rule == "random":
        pick = int(torch.randint(m, (1,), generator=generator))
        one_hot = torch.zeros(m, dtype=stacked.dtype, device=stacked.device)
        one_hot[pick] = 1.0
        return stacked[pick], one_hot
    raise ValueError(f"unknown combine rule {rule!r}; allowed: {', '.join(COMBINE_RULES)}")


def combine_logits(stacked: torch.Tensor, rule: str = "mean", weights: list[float] | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Combine teacher logits ``stacked`` of shape (M, B, C) into (B, C) by ``rule``."""
    return combine(stacked, rule, weights, generator)[0]


def ensemble_output(members: list[ModelOutput], rule: str, weights: list[float] | None,
                    generator: torch.Generator | None) -> ModelOutput:
    """The ensemble's output: combined logits, plus ``members`` (each teacher's own output, logits in
    the dataset's class order) and ``member_weights`` (M,) for per-teacher losses."""
    logits, member_weights = combine(torch.stack([o.logits for o in members]), rule, weights, generator)
    out = ModelOutput(logits)
    out.members = members
    out.member_weights = member_weights
    return out


class TeacherEnsemble(nn.Module):
    """Several frozen :class:`~kdray.algorithms.distiller.Teacher` s in one process, combined per batch.

    The output's ``members`` keep each teacher's own output (its logits in the dataset's class order,
    its features), so feature methods put one connector per teacher (``Distiller(num_teachers=M)``);
    ``member_weights`` says how much each teacher's feature loss counts this step.
    """

    def __init__(self, teachers: list[nn.Module], rule: str = "mean", weights: list[float] | None = None,
                 seed: int = 0):
        super().__init__()
        if len(teachers) < 2:
            raise ValueError(f"a multi-teacher ensemble needs at least 2 teachers, got {len(teachers)}")
        if rule not in COMBINE_RULES:
            raise ValueError(f"unknown combine rule {rule!r}; allowed: {', '.join(COMBINE_RULES)}")
        self.teachers = nn.ModuleList(teachers)
        self.rule, self.weights = rule, weights
        self.generator = torch.Generator().manual_seed(seed)

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, inputs: torch.Tensor) -> ModelOutput:
        return ensemble_output([t(inputs) for t in self.teachers], self.rule, self.weights, self.generator)
