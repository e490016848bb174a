"""Recorded augmentations ("views") of a training set, and the row-id samplers a teacher-output cache needs.

A *view* ``v`` of training sample ``i`` is what the split's own random transform produces when every random
number generator it may draw from (torch's CPU generator, Python's ``random``, NumPy's global state) is seeded
with :func:`view_key` ``(seed, i, v)``. torchvision's transforms draw from torch's global generator, so the
same key rebuilds the exact same crop / flip / colour jitter in any process, on any machine; the generators
are saved and restored around it, so nothing else sees the seeding.

A cache row is addressed by one integer, ``row = i * views + v`` (fixed views: ``row = i``). The student's
batches carry that row id in ``Batch.indices`` (the batch stays ``(x, y, index)``), and the cached teacher
looks it up directly:

- :class:`ViewDataset` maps ``row -> (view v of sample i, y, row)``;
- :class:`RowSampler` turns a sampler of sample indices into row ids, choosing in epoch ``e`` the view
  ``(e + offset(seed, i)) % use_views``: every view is used once per ``use_views`` epochs and the samples of one
  batch see different views;
- :class:`ShardSampler` is the per-worker sampler of a data-parallel run that holds only its shard of the
  cache (samples ``i % world == rank``): a per-epoch permutation of that shard (seeded by ``seed + epoch``, like
  ``DistributedSampler``, so a resumed run sees the same batches), padded with its own first samples so every
  worker takes the same number of steps.
"""
from __future__ import annotations

import contextlib
import math
import random

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
        return x ^ (x >> np.uint64(31))


def _splitmix64_int(x: int) -> int:
    m = 0xFFFFFFFFFFFFFFFF
    x = (x + 0x9E3779B97F4A7C15) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def view_key(seed: int, index, view) -> np.ndarray | int:
    """The 63-bit generator seed of view ``view`` of sample ``index`` (vectorised over arrays; an int for ints)."""
    if isinstance(index, (int, np.integer)) and isinstance(view, (int, np.integer)):
        m = 0xFFFFFFFFFFFFFFFF
        key = _splitmix64_int(_splitmix64_int(_splitmix64_int(int(seed) & m) ^ (int(index) & m)) ^ (int(view) & m))
        return key >> 1
    i = np.asarray(index, dtype=np.int64).astype(np.uint64)
    v = np.asarray(view, dtype=np.int64).astype(np.uint64)
    s = np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF)
    key = _splitmix64(_splitmix64(_splitmix64(np.full_like(i, s)) ^ i) ^ v) >> np.uint64(1)
    return key.astype(np.int64)


@contextlib.contextmanager
def seeded(key: int):
    """Seed torch's CPU generator, ``random`` and NumPy's global generator with ``key``; restore them after."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(key))
        random.seed(int(key))
        np.random.seed(int(key) % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class ViewDataset(Dataset):
    """``row -> (x, y, row)`` where ``x`` is view ``row % views`` of sample ``row // views`` of ``base``
    (an ``(x, y, index)`` training split), rebuilt under its :func:`view_key`."""

    def __init__(self, base: Dataset, views: int, seed: int):
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        self.base, self.views, self.seed = base, int(views), int(seed)

    def __len__(self):
        return len(self.base) * self.views

    def view(self, index: int, view: int):
        with seeded(view_key(self.seed, int(index), int(view))):
            return self.base[int(index)]

    def __getitem__(self, row):
        index, view = divmod(int(row), self.views)
        x, y = self.view(index, view)[:2]
        return x, y, int(row)


def view_of_epoch(seed: int, indices: torch.Tensor, epoch: int, use_views: int) -> torch.Tensor:
    """The view each sample uses in ``epoch``: ``(epoch + offset(seed, i)) % use_views``."""
    offset = view_key(seed, indices.numpy(), np.full(len(indices), -1)) % use_views
    return (torch.from_numpy(offset) + epoch) % use_views


class RowSampler(Sampler):
    """Cache row ids ``i * views + view(epoch, i)`` for the sample indices ``i`` of ``base`` (a sampler with
    ``set_epoch``). With ``views == 1`` the rows are the sample indices."""

    def __init__(self, base, views: int = 1, use_views: int | None = None, seed: int = 0):
        self.base, self.views, self.seed = base, int(views), int(seed)
        self.use_views = int(use_views or views)
        if not 1 <= self.use_views <= self.views:
            raise ValueError(f"use_views must be in [1, {self.views}], got {use_views}")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __len__(self):
        return len(self.base)

    def __iter__(self):
        indices = torch.as_tensor(list(iter(self.base)), dtype=torch.long)
        if self.views == 1:
            return iter(indices.tolist())
        views = view_of_epoch(self.seed, indices, self.epoch, self.use_views)
        return iter((indices * self.views + views).tolist())


def shard_of(num_samples: int, rank: int, world: int) -> np.ndarray:
    """The sample indices a worker owns in a sharded cache: ``i % world == rank``."""
    return np.arange(rank, num_samples, world, dtype=np.int64)


class ShardSampler(Sampler):
    """Sample indices of one worker's shard, reshuffled every epoch by ``seed + epoch`` and padded (with the
    epoch's own first samples) to ``ceil(num_samples / world)``, the length every worker uses."""

    def __init__(self, samples, num_samples: int, world: int, seed: int = 0):
        self.samples = torch.as_tensor(np.asarray(samples), dtype=torch.long)
        if len(self.samples) == 0:
            raise ValueError("this worker's cache shard holds no samples")
        self.length = math.ceil(num_samples / world)
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self):
        return self.length

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = self.samples[torch.randperm(len(self.samples), generator=g)]
        reps = math.ceil(self.length / len(order))
        return iter(order.repeat(reps)[: self.length].tolist())


def cached_train_data(train: Dataset, cache, sampler, seed: int, world: int):
    """The training dataset and sampler of a run that trains from a teacher cache (``cache``: a
    :class:`~kdray.algorithms.cached_teacher.CachedTeacher`). Recorded views: the dataset rebuilds view ``v``
    of sample ``i`` for row ``i * views + v``. A sharded cache (this worker holds only its samples): a
    :class:`ShardSampler` over them replaces ``sampler`` (a ``DistributedSampler`` over the whole split)."""
    if cache.sharded:
        sampler = ShardSampler(cache.samples(), cache.num_samples, world, seed)
    dataset = train if cache.view_seed is None else ViewDataset(train, cache.views, cache.view_seed)
    if cache.views > 1 or cache.sharded:
        sampler = RowSampler(sampler, cache.views, cache.use_views, seed)
    return dataset, sampler
