"""A teacher source that looks its outputs up by sample index instead of running a network (the FKD idea).

Pure PyTorch: the orchestrator reads the cache (Parquet, see :mod:`kdray.orchestrator.teacher_cache`)
into an index-addressed tensor and hands it to :class:`CachedTeacher`. The training loop sees a teacher
that wants the whole :class:`Batch` (``wants_batch = True``), because the lookup key is ``batch.indices``,
the sample's index in the training split. Only *fixed views* are cached in this version: the cached
logits are valid only when the training transform is deterministic (Beyer et al. 2022, "Knowledge
distillation: A good teacher is patient and consistent": the teacher must see the student's exact view).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

from kdray.algorithms.base import Batch, ModelOutput


def logits_from_topk(values: torch.Tensor, indices: torch.Tensor, lse: torch.Tensor | None,
                     num_classes: int) -> torch.Tensor:
    """Dense ``[N, num_classes]`` logits from the top-k teacher logits.

    With ``lse`` (the logsumexp of the full logits, at temperature 1) the top-k entries keep their exact
    softmax probabilities at ``T = 1`` and the remaining probability mass is spread evenly over the other
    classes; without it the other classes get the smallest top-k logit minus 20 (almost no mass). With
    ``k == num_classes`` the result is the full logits exactly. At ``T != 1`` a top-k cache is an
    approximation (the tail's shape is lost).
    """
    values = values.float()
    n, k = values.shape
    indices = indices.long()
    if k > num_classes:
        raise ValueError(f"top-k of {k} exceeds the {num_classes} classes")
    if k == num_classes:
        fill = torch.zeros(n, dtype=values.dtype, device=values.device)
    elif lse is not None:
        lse = lse.float()
        top_mass = torch.exp(values.double() - lse.double()[:, None]).sum(dim=1)
        rest = (1.0 - top_mass).clamp_min(1e-30)
        fill = (lse.double() + torch.log(rest) - math.log(num_classes - k)).float()
        fill = torch.minimum(fill, values.min(dim=1).values)
    else:
        fill = values.min(dim=1).values - 20.0
    out = fill[:, None].expand(n, num_classes).clone()
    out.scatter_(1, indices, values)
    return out


class CachedTeacher(nn.Module):
    """Teacher outputs looked up by ``batch.indices`` in an ``[N, C]`` tensor (row ``i`` = training sample ``i``).

    Behaves like :class:`~kdray.algorithms.distiller.Teacher` for the loop: always ``eval()``, no
    gradients, ``.to(device)`` moves the table (a non-persistent buffer, so it never enters a checkpoint).
    ``features`` are cached feature maps by point name (none in this version's caches).
    """

    wants_batch = True

    def __init__(self, logits: torch.Tensor, features: dict[str, torch.Tensor] | None = None,
                 source: str = "cache"):
        super().__init__()
        if logits.dim() != 2:
            raise ValueError(f"cached logits must be [samples, classes], got shape {tuple(logits.shape)}")
        self.register_buffer("logits", logits.detach().float().contiguous(), persistent=False)
        self.points = list(features or {})
        for i, name in enumerate(self.points):
            self.register_buffer(f"_feature{i}", features[name].detach().contiguous(), persistent=False)
        self.source = source

    @property
    def num_samples(self) -> int:
        return self.logits.shape[0]

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def lookup(self, indices: torch.Tensor) -> ModelOutput:
        idx = indices.to(self.logits.device, non_blocking=True)
        logits = self.logits.index_select(0, idx)
        feats = {name: getattr(self, f"_feature{i}").index_select(0, idx) for i, name in enumerate(self.points)}
        return ModelOutput(logits, feats)

    def forward(self, batch: Batch) -> ModelOutput:
        return self.lookup(batch.indices)

    def bind(self, indices) -> Callable[[torch.Tensor], ModelOutput]:
        """A live-teacher-shaped callable (``inputs -> ModelOutput``) for fixed samples, e.g. the example
        batch :meth:`Distiller.build` runs the teacher on."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        return lambda _inputs: self.lookup(indices)

    def extra_repr(self) -> str:
        return f"samples={self.logits.shape[0]}, classes={self.logits.shape[1]}, source={self.source!r}"
