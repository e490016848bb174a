"""A teacher source that looks its outputs up by cache row instead of running a network (the FKD idea).

Pure PyTorch: the orchestrator reads the cache (Parquet, see :mod:`kdray.orchestrator.teacher_cache`)
into a row-addressed tensor and hands it to :class:`CachedTeacher`. The training loop sees a teacher
that wants the whole :class:`Batch` (``wants_batch = True``), because the lookup key is ``batch.indices``:
the cache row id ``i * views + v`` of view ``v`` of training sample ``i`` (fixed views: ``views == 1``, the
row is the sample index). Cached logits are valid only for the exact view the teacher saw (Beyer et al.
2022, "Knowledge distillation: A good teacher is patient and consistent"): fixed views for a deterministic
training transform, or N recorded augmentations that the student's data rebuilds from their keys
(:mod:`kdray.data.views`). A data-parallel worker may hold only its shard of the rows (``rows``).
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
    """Teacher outputs looked up by ``batch.indices`` (cache row ids) in a ``[R, C]`` tensor.

    ``rows=None``: row ``r`` of ``logits`` is cache row ``r`` (the whole cache). Otherwise ``rows`` holds the
    sorted cache row ids of the ``logits`` rows this worker holds (its shard) and a lookup of a row it does not
    hold is an error. ``views`` is the number of recorded views per sample (``row = i * views + v``),
    ``view_seed`` the seed of their keys (``None``: fixed views), ``num_samples`` the training-set size.

    Behaves like :class:`~kdray.algorithms.distiller.Teacher` for the loop: always ``eval()``, no
    gradients, ``.to(device)`` moves the table (non-persistent buffers, so it never enters a checkpoint).
    ``features`` are cached feature maps by point name (none in this version's caches).
    """

    wants_batch = True

    def __init__(self, logits: torch.Tensor, features: dict[str, torch.Tensor] | None = None,
                 source: str = "cache", rows: torch.Tensor | None = None, views: int = 1,
                 view_seed: int | None = None, num_samples: int | None = None):
        super().__init__()
        if logits.dim() != 2:
            raise ValueError(f"cached logits must be [samples, classes], got shape {tuple(logits.shape)}")
        self.register_buffer("logits", logits.detach().float().contiguous(), persistent=False)
        if rows is not None:
            rows = torch.as_tensor(rows, dtype=torch.long)
            if rows.shape != (logits.shape[0],) or (len(rows) > 1 and not bool((rows[1:] > rows[:-1]).all())):
                raise ValueError("rows must be the sorted, distinct cache row ids of the logits' rows")
        self.register_buffer("rows", rows, persistent=False)
        self.points = list(features or {})
        for i, name in enumerate(self.points):
            self.register_buffer(f"_feature{i}", features[name].detach().contiguous(), persistent=False)
        self.source, self.views, self.view_seed = source, int(views), view_seed
        self.use_views = int(views)  # how many of the recorded views the run cycles through (<= views)
        self.num_samples = int(num_samples if num_samples is not None else logits.shape[0] // self.views)
        self.rows_per_worker: list[int] | None = None  # filled in by the orchestrator for a sharded cache

    @property
    def num_rows(self) -> int:
        """Rows held here (the shard's, or the whole cache's)."""
        return self.logits.shape[0]

    @property
    def sharded(self) -> bool:
        return self.rows is not None

    def samples(self) -> torch.Tensor:
        """The training-sample indices whose rows are held here."""
        if self.rows is None:
            return torch.arange(self.num_samples)
        return torch.unique(self.rows.cpu() // self.views)

    def train(self, mode: bool = True):
        return super().train(False)

    def _positions(self, rows: torch.Tensor) -> torch.Tensor:
        if self.rows is None:
            return rows
        pos = torch.searchsorted(self.rows, rows).clamp_max(len(self.rows) - 1)
        missing = self.rows.index_select(0, pos) != rows
        if bool(missing.any()):
            row = int(rows[missing][0])
            raise KeyError(f"cache row {row} (sample {row // self.views}, view {row % self.views}) is not in this "
                           f"worker's shard of {self.source}")
        return pos

    @torch.no_grad()
    def lookup(self, rows: torch.Tensor) -> ModelOutput:
        idx = self._positions(rows.to(self.logits.device, non_blocking=True).long())
        logits = self.logits.index_select(0, idx)
        feats = {name: getattr(self, f"_feature{i}").index_select(0, idx) for i, name in enumerate(self.points)}
        return ModelOutput(logits, feats)

    def forward(self, batch: Batch) -> ModelOutput:
        return self.lookup(batch.indices)

    def bind(self, indices) -> Callable[[torch.Tensor], ModelOutput]:
        """A live-teacher-shaped callable (``inputs -> ModelOutput``) for the example batch
        :meth:`Distiller.build` runs the teacher on (shapes only): view 0 of the given samples, or, on a worker
        whose shard does not hold them, its own first rows."""
        rows = torch.as_tensor(indices, dtype=torch.long) * self.views
        if self.rows is not None and not bool(torch.isin(rows, self.rows.cpu()).all()):
            rows = self.rows.cpu()[: len(rows)]
        return lambda _inputs: self.lookup(rows)

    def extra_repr(self) -> str:
        held = f", rows held={self.num_rows} (shard)" if self.rows is not None else ""
        return (f"samples={self.num_samples}, views={self.views}, classes={self.logits.shape[1]}{held}, "
                f"source={self.source!r}")
