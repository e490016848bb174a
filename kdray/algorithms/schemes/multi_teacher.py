"""Multi-teacher distillation: M frozen teachers combined into one teaching signal.

Combination rules (the survey's multi-teacher section, Sec. 4.2):
- ``mean``: the average of the teachers' logits (You et al., KDD 2017 average the soft targets; averaging
  logits is the normalised geometric mean of their distributions and keeps the knowledge terms unchanged);
- ``weights``: a fixed convex combination (weights normalised to sum 1);
- ``confidence``: per-sample weights ``softmax(-H(p_m))`` over teachers, so the teacher that is more
  certain about a sample (lower entropy) counts more (in the spirit of CA-MKD, Zhang et al. 2022, which
  weights by the teacher's cross-entropy; entropy needs no labels);
- ``random``: one teacher per step, drawn uniformly (Fukuda et al., Interspeech 2017).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.algorithms.base import ModelOutput

COMBINE_RULES = ("mean", "weights", "confidence", "random")


def combine_logits(stacked: torch.Tensor, rule: str = "mean", weights: list[float] | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Combine teacher logits ``stacked`` of shape (M, B, C) into (B, C) by ``rule``."""
    m = stacked.shape[0]
    if rule == "mean":
        return stacked.mean(0)
    if rule == "weights":
        if weights is None or len(weights) != m:
            raise ValueError(f"combine 'weights' needs {m} weights, got {weights}")
        w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"teacher weights must be >= 0 with a positive sum, got {weights}")
        return torch.einsum("m,mbc->bc", w / w.sum(), stacked)
    if rule == "confidence":
        log_p = F.log_softmax(stacked, dim=2)
        entropy = -(log_p.exp() * log_p).sum(2)  # (M, B)
        w = torch.softmax(-entropy, dim=0)  # over teachers, per sample
        return (w.unsqueeze(2) * stacked).sum(0)
    if rule == "random":
        pick = int(torch.randint(m, (1,), generator=generator))
        return stacked[pick]
    raise ValueError(f"unknown combine rule {rule!r}; allowed: {', '.join(COMBINE_RULES)}")


class TeacherEnsemble(nn.Module):
    """Several frozen :class:`~kdray.algorithms.distiller.Teacher` s in one process, combined per batch.

    The output's ``members`` keep each teacher's own output, so feature methods can put one connector
    per teacher (see ``Distiller(num_teachers=M)``).
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
        members = [t(inputs) for t in self.teachers]
        stacked = torch.stack([o.logits for o in members])
        out = ModelOutput(combine_logits(stacked, self.rule, self.weights, self.generator))
        out.members = members
        return out
