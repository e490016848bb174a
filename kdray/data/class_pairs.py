"""Batches of class pairs for class-wise self-knowledge distillation (CS-KD, Yun et al. CVPR 2020).

CS-KD matches the student's prediction on a sample to its prediction on *another sample of the same class*, so
each batch is ``[x_1 .. x_B, x'_1 .. x'_B]`` where ``x'_i`` is drawn uniformly among the other training samples of
``x_i``'s class: a batch of ``2 B`` indices whose second half pairs with the first. The anchors ``x_1 .. x_B`` are
an epoch's shuffled pass over the split (every sample once per epoch, as with the ordinary sampler), so
``batch_size`` anchors per batch make the same number of steps per epoch as plain training.

This follows the authors' ``PairBatchSampler`` (alinlab/cs-kd): anchors in shuffled order, one random same-class
partner each. Unlike it, the draw is a function of ``(seed, epoch)`` through :meth:`set_epoch` (a resumed stage
sees the batches the uninterrupted one saw) and the anchors can be split across ranks (``rank`` /
``world_size``: each rank takes every ``world_size``-th anchor, the global batch staying ``batch_size * world``).
A class with a single sample pairs it with itself (the official code would do the same).
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ClassPairBatchSampler(Sampler[list[int]]):
    """Yields ``2 * batch_size`` indices per batch: ``batch_size`` shuffled anchors, then one partner of the same
    class for each (last batch: the remaining anchors and their partners). ``targets``: every sample's class."""

    def __init__(self, targets, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False):
        targets = torch.as_tensor(targets, dtype=torch.long).flatten()
        if batch_size < 1:
            raise ValueError(f"class pairs: batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"class pairs: rank {rank} is not in [0, {world_size})")
        if targets.numel() == 0:
            raise ValueError("class pairs: the split is empty")
        self.targets = targets
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self.by_class = {int(c): (targets == c).nonzero().flatten() for c in targets.unique()}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def anchors(self) -> torch.Tensor:
        """This rank's anchors of the current epoch, in order."""
        g = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch)
        return torch.randperm(len(self.targets), generator=g)[self.rank::self.world_size]

    def partners(self, anchors: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """For each anchor, a uniformly drawn *other* sample of its class (itself when it is alone in it)."""
        out = torch.empty_like(anchors)
        for k, a in enumerate(anchors.tolist()):
            same = self.by_class[int(self.targets[a])]
            if len(same) == 1:
                out[k] = a
                continue
            j = int(torch.randint(len(same) - 1, (1,), generator=generator))
            pick = int(same[j])
            out[k] = int(same[-1]) if pick == a else pick  # skip the anchor itself: uniform over the others
        return out

    def __iter__(self) -> Iterator[list[int]]:
        anchors = self.anchors()
        g = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch + 7 + self.rank)
        for start in range(0, len(anchors), self.batch_size):
            chunk = anchors[start:start + self.batch_size]
            if self.drop_last and len(chunk) < self.batch_size:
                return
            yield chunk.tolist() + self.partners(chunk, g).tolist()

    def __len__(self) -> int:
        n = len(range(self.rank, len(self.targets), self.world_size))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)
