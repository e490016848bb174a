"""The device data pipeline: a training split that fits in memory lives on the training device as its native
small-dtype tensor (CIFAR / FakeData: uint8), and each batch is cut, augmented and normalised there in one
batched gather, instead of a PIL image per sample in DataLoader workers.

What goes on the device (:func:`device_refusal` says why not, in one line): a split built by
:func:`~kdray.data.build_datasets` whose base is a ``TensorDataset`` (digits; used as is), torchvision
``CIFAR10`` / ``CIFAR100`` or ``FakeData`` under ``IndexedDataset`` / ``Subset`` wrappers, with the training
transform ``[RandomCrop(size, padding=p)] [RandomHorizontalFlip(p)] ToTensor [Normalize]`` (zero fill, the
image's own size): the CIFAR recipe. Anything else (ImageFolder, other transforms) stays on the per-sample path.

The batches (:func:`device_batches`) are the per-sample ``DataLoader``'s, in the same order: the sample order
comes from the very same sampler (a ``DistributedSampler(split, world_size, rank, shuffle=True, seed=seed)``
with ``set_epoch``, or, with a teacher cache, :func:`~kdray.data.views.cached_train_data`'s row sampler), cut
into ``batch_size`` (per worker) batches, the last one short; each batch is ``(inputs, targets, indices)`` on
the device, ``indices`` being what the per-sample path yields (split indices, or cache row ids). So the
shuffling contract is DistributedSampler's: a function of (seed, epoch, rank, world_size); a stage resumed at
epoch ``k`` sees exactly the batches of the uninterrupted run.

Augmentation parameters:

- no cache, or a fixed-view cache: crop offsets and flip of sample ``i`` in epoch ``e`` come from the 63-bit
  key :func:`~kdray.data.views.view_key` ``(seed, i, AUGMENT_STREAM + e)`` by arithmetic (``dy = key % (2p+1)``,
  ``dx = key // (2p+1) % (2p+1)``, flip when the key's bits 40..63 as a fraction of 2**24 fall below the flip
  probability): uniform offsets and a Bernoulli flip, the distribution of torchvision's transforms (tested),
  independent of rank, world size and batch layout. They are not torchvision's own draws (those come from
  torch's global generator, whose state depends on everything else the process drew).
- recorded views of a teacher cache (``cache.view_seed`` set): row ``i * views + v`` gets *exactly* the crop
  and flip the per-sample path makes under ``view_key(view_seed, i, v)``: torchvision's own draws
  (``randint`` row, ``randint`` column, ``rand`` flip) are replayed from that key by torch's generator's own
  recurrence (vectorised MT19937), once per held row when the batches are made. So the student sees the very views the teacher was run on (tested
  against :class:`~kdray.data.views.ViewDataset`), the cache's keys unchanged.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Subset, TensorDataset

from kdray.data.views import view_key

#: The view number offset of device-path augmentation keys (epoch ``e`` uses ``view_key(seed, i, AUGMENT_STREAM +
#: e)``), far above any recorded-view number, so the two never share a key.
AUGMENT_STREAM = 1 << 32


class NotOnDeviceError(ValueError):
    """A dataset the device pipeline cannot hold or reproduce; the message says why, in one line."""


@dataclass(frozen=True)
class Augment:
    """The random part of a training transform, as the device applies it: a ``size``-preserving
    ``RandomCrop`` with zero ``padding`` (0: none), then a horizontal flip with probability ``flip``."""

    padding: int = 0
    flip: float = 0.0


@dataclass
class DeviceData:
    """A split as tensors, in split-index order: ``images`` ``(N, C, H, W)`` (uint8: scaled by 1/255 as
    ``ToTensor`` does; any float dtype: used as is), ``targets`` ``(N,)`` int64, the ``Normalize`` mean/std
    (``None``: none) and the random ``augment`` (``None``: a deterministic transform)."""

    images: torch.Tensor
    targets: torch.Tensor
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    augment: Augment | None = None

    def __len__(self) -> int:
        return len(self.targets)

    def to(self, device) -> "DeviceData":
        return replace(self, images=self.images.to(device), targets=self.targets.to(device))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 -> float / 255 (``ToTensor``), then ``(x - mean) / std`` (``Normalize``): the same float ops in
        the same order, so the values equal the per-sample path's."""
        if x.dtype == torch.uint8:
            x = x.float().div_(255)
        if self.mean is not None:
            if getattr(self, "_stats", None) is None or self._stats[0].device != x.device:
                self._stats = tuple(torch.as_tensor(v, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
                                    for v in (self.mean, self.std))  # made once, not a copy to the device a batch
            mean, std = self._stats
            x = x.sub_(mean.to(x.dtype)).div_(std.to(x.dtype))
        return x


# --- recognising a split -----------------------------------------------------------------------------------
def split_base(dataset: Dataset) -> tuple[Dataset, np.ndarray | None]:
    """The base dataset under IndexedDataset / Subset wrappers and the base indices of the split's samples
    (``None``: all, in order)."""
    from kdray.data.registry import IndexedDataset

    indices = None
    while True:
        if isinstance(dataset, IndexedDataset):
            dataset = dataset.base
        elif isinstance(dataset, Subset):
            sub = np.asarray(dataset.indices, dtype=np.int64)
            indices = sub if indices is None else sub[indices]
            dataset = dataset.dataset
        else:
            return dataset, indices


def _parse_transform(transform, image_hw: tuple[int, int]):
    """``(augment or None, mean, std, to_tensor)`` of a torchvision transform the device reproduces, else
    :class:`NotOnDeviceError` naming the part it does not."""
    from torchvision import transforms as T

    parts = list(transform.transforms) if isinstance(transform, T.Compose) else [transform]
    padding, flip, to_tensor, mean, std = 0, 0.0, False, None, None
    stage = 0  # the canonical order: 0 start, 1 after the crop, 2 after the flip, 3 after ToTensor, 4 Normalize
    for part in parts:
        name = type(part).__name__
        if isinstance(part, T.RandomCrop) and stage == 0:
            pad = part.padding
            pads = [pad] if isinstance(pad, int) else list(pad or [0])
            size = tuple(part.size) if isinstance(part.size, (tuple, list)) else (part.size, part.size)
            if size != tuple(image_hw) or len(set(pads)) != 1 or part.padding_mode != "constant" or part.fill != 0:
                raise NotOnDeviceError(f"{part!r} is not a same-size, uniformly zero-padded crop of "
                                       f"{image_hw[0]}x{image_hw[1]} images")
            padding, stage = int(pads[0]), 1
        elif isinstance(part, T.RandomHorizontalFlip) and stage <= 1:
            flip, stage = float(part.p), 2
        elif isinstance(part, T.ToTensor) and stage <= 2:
            to_tensor, stage = True, 3
        elif isinstance(part, T.Normalize) and stage == 3:
            mean, std, stage = tuple(float(m) for m in part.mean), tuple(float(s) for s in part.std), 4
        else:
            raise NotOnDeviceError(f"transform {name} (in this order) is not one the device pipeline reproduces "
                                   f"(it does [RandomCrop] [RandomHorizontalFlip] ToTensor [Normalize])")
    if not to_tensor:
        raise NotOnDeviceError("the transform has no ToTensor")
    augment = Augment(padding, flip) if (padding or flip) else None
    return augment, mean, std


def _describe(dataset: Dataset):
    """``(kind, base, indices, n, image_shape, dtype_bytes)`` of a split the device can hold, else raise."""
    base, indices = split_base(dataset)
    n = len(dataset)
    if getattr(base, "target_transform", None) is not None:
        raise NotOnDeviceError(f"{type(base).__name__} has a target_transform")
    if isinstance(base, TensorDataset):
        x = base.tensors[0]
        return "tensor", base, indices, n, tuple(x.shape[1:]), x.element_size()
    from torchvision import datasets as D  # after the tensor case: a digits job's processes never import torchvision

    if isinstance(base, D.CIFAR10):  # CIFAR100 too
        h, w, c = base.data.shape[1:]
        return "cifar", base, indices, n, (c, h, w), 1
    if isinstance(base, D.FakeData):
        return "fake", base, indices, n, tuple(base.image_size), 1
    raise NotOnDeviceError(f"{type(base).__name__} is not a dataset the device pipeline reads (it reads "
                           f"TensorDataset, CIFAR10/100 and FakeData splits)")


def device_data(dataset: Dataset) -> DeviceData:
    """The split ``dataset`` (``(x, y, index)`` items from :func:`~kdray.data.build_datasets`) as
    :class:`DeviceData` on the CPU, or :class:`NotOnDeviceError`."""
    kind, base, indices, n, shape, _ = _describe(dataset)
    if kind == "tensor":
        x, y = base.tensors[0], base.tensors[1]
        sel = torch.from_numpy(indices) if indices is not None else slice(None)
        return DeviceData(x[sel].contiguous(), y[sel].long().contiguous())
    if base.transform is None:
        raise NotOnDeviceError(f"{type(base).__name__} without a transform yields PIL images, not tensors")
    augment, mean, std = _parse_transform(base.transform, shape[1:])
    if kind == "cifar":
        sel = indices if indices is not None else slice(None)
        images = torch.from_numpy(np.ascontiguousarray(base.data[sel])).permute(0, 3, 1, 2).contiguous()
        targets = torch.as_tensor(np.asarray(base.targets, dtype=np.int64)[sel])
    else:  # FakeData: each image is made from its index; make them once, as the uint8 image ToTensor reads
        from torchvision import datasets as D

        plain = D.FakeData(len(base), base.image_size, base.num_classes, random_offset=base.random_offset)
        order = indices if indices is not None else range(n)
        pairs = [plain[int(i)] for i in order]
        images = torch.stack([torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).reshape(
            shape[1], shape[2], -1).permute(2, 0, 1) for img, _ in pairs]) if pairs else \
            torch.empty((0, *shape), dtype=torch.uint8)
        targets = torch.tensor([t for _, t in pairs], dtype=torch.long)
    return DeviceData(images, targets, mean, std, augment)


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def device_refusal(dataset: Dataset, device, memory_fraction: float = 0.25) -> str | None:
    """Why ``dataset`` cannot use the device pipeline on ``device`` (one line), or ``None`` when it can: a
    dataset it reads with a transform it reproduces, whose tensors (padded for the crop) take at most
    ``memory_fraction`` of the device's free memory. Cheap: nothing is loaded."""
    device = torch.device(device)
    try:
        kind, base, _indices, n, shape, itemsize = _describe(dataset)
        pad = 0
        if kind != "tensor":
            if base.transform is None:
                raise NotOnDeviceError(f"{type(base).__name__} without a transform yields PIL images")
            augment = _parse_transform(base.transform, shape[1:])[0]
            pad = augment.padding if augment else 0
    except NotOnDeviceError as err:
        return str(err)
    need = n * shape[0] * (shape[1] + 2 * pad) * (shape[2] + 2 * pad) * itemsize
    have = _available_bytes(device)
    if need > memory_fraction * have:
        return (f"the split needs {need / 2**20:.0f} MiB on {device}, more than {memory_fraction:.0%} of its "
                f"{have / 2**20:.0f} MiB free")
    return None


def can_use_device_pipeline(dataset: Dataset, device, memory_fraction: float = 0.25) -> bool:
    """Whether :func:`device_batches` can serve ``dataset`` on ``device`` (see :func:`device_refusal`)."""
    return device_refusal(dataset, device, memory_fraction) is None


# --- augmentation parameters -------------------------------------------------------------------------------
def augment_params(seed: int, indices: np.ndarray, epoch: int, augment: Augment) -> np.ndarray:
    """``(n, 3)`` int64 ``[dy, dx, flip]`` of samples ``indices`` in ``epoch`` (device path, no recorded views):
    arithmetic on ``view_key(seed, i, AUGMENT_STREAM + epoch)``."""
    indices = np.asarray(indices, dtype=np.int64)
    key = np.asarray(view_key(seed, indices, np.full(len(indices), AUGMENT_STREAM + int(epoch))), dtype=np.int64)
    span = 2 * augment.padding + 1
    out = np.zeros((len(indices), 3), dtype=np.int64)
    out[:, 0] = key % span
    out[:, 1] = (key // span) % span
    out[:, 2] = ((key >> 39) & 0xFFFFFF) < int(round(augment.flip * 2**24))  # bits 39..62 of the 63-bit key
    return out


def _mt19937_outputs(keys: np.ndarray, count: int) -> np.ndarray:
    """``(n, count)`` the first ``count`` 32-bit outputs of torch's CPU generator after ``manual_seed(key)``
    (MT19937 seeded with the key's low 32 bits, as ``at::mt19937`` does), vectorised over keys: output ``k``
    needs only state words ``k``, ``k + 1`` and ``k + 397`` of the seeding recurrence."""
    m32 = np.uint64(0xFFFFFFFF)
    x = np.asarray(keys, dtype=np.int64).astype(np.uint64) & m32
    need = set(range(count + 1)) | set(range(397, 397 + count))
    state = {0: x}
    for j in range(1, max(need) + 1):
        x = (np.uint64(1812433253) * (x ^ (x >> np.uint64(30))) + np.uint64(j)) & m32
        if j in need:
            state[j] = x
    out = np.zeros((len(x), count), dtype=np.uint64)
    for k in range(count):
        y = (state[k] & np.uint64(0x80000000)) | (state[k + 1] & np.uint64(0x7FFFFFFF))
        v = state[k + 397] ^ (y >> np.uint64(1)) ^ np.where(y & np.uint64(1), np.uint64(0x9908B0DF), np.uint64(0))
        v ^= v >> np.uint64(11)
        v ^= (v << np.uint64(7)) & np.uint64(0x9D2C5680)
        v ^= (v << np.uint64(15)) & np.uint64(0xEFC60000)
        v ^= v >> np.uint64(18)
        out[:, k] = v & m32
    return out


def replayed_params(keys: np.ndarray, augment: Augment) -> np.ndarray:
    """``(n, 3)`` ``[dy, dx, flip]`` that torchvision's ``RandomCrop(padding=p)`` then ``RandomHorizontalFlip``
    draw when torch's generator is seeded with each key (what :class:`~kdray.data.views.ViewDataset` does):
    ``randint(0, 2p+1)`` row, ``randint(0, 2p+1)`` column (a 32-bit output modulo the range), ``rand() < p_flip``
    (its low 24 bits / 2**24, float32). Computed from the generator's own recurrence, vectorised (tested against
    ``torch.Generator`` draws)."""
    keys = np.asarray(keys, dtype=np.int64)
    out = np.zeros((len(keys), 3), dtype=np.int64)
    draws = (2 if augment.padding else 0) + (1 if augment.flip else 0)
    if not draws or not len(keys):
        return out
    raw = _mt19937_outputs(keys, draws)
    span = np.uint64(2 * augment.padding + 1)
    if augment.padding:
        out[:, 0], out[:, 1] = (raw[:, 0] % span).astype(np.int64), (raw[:, 1] % span).astype(np.int64)
    if augment.flip:
        u = (raw[:, draws - 1] & np.uint64(0xFFFFFF)).astype(np.float32) * np.float32(2.0 ** -24)
        out[:, 2] = u < np.float32(augment.flip)
    return out


# --- the batches ------------------------------------------------------------------------------------------
class DeviceBatches:
    """An iterable of ``(inputs, targets, indices)`` batches made on the device, with ``len()``, ``set_epoch``
    and ``sampler`` (the sampler giving the order: :class:`~kdray.algorithms.engine.TrainLoop` calls
    ``loader.sampler.set_epoch``). Build it with :func:`device_batches`."""

    def __init__(self, data: DeviceData, sampler, batch_size: int, seed: int, device,
                 views: int = 1, view_seed: int | None = None, rows: np.ndarray | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.sampler, self.batch_size, self.seed = sampler, int(batch_size), int(seed)
        self.views, self.view_seed = int(views), view_seed
        aug = data.augment
        self._pad = aug.padding if aug else 0
        n, c, h, w = data.images.shape
        self._hw = (h, w)
        if self._pad:  # only the padded store goes to the device (zero fill, as RandomCrop's): padded on the host
            padded = torch.nn.functional.pad(data.images, (self._pad,) * 4).to(self.device)
            data = replace(data, images=data.images[:0])
        self.data = data.to(self.device)
        self._flat = (padded if self._pad else self.data.images).reshape(-1)
        self._sample_size = c * (h + 2 * self._pad) * (w + 2 * self._pad)
        hp, wp = h + 2 * self._pad, w + 2 * self._pad
        self._channel_rows = (torch.arange(c, device=self.device).view(c, 1, 1) * hp * wp
                              + torch.arange(h, device=self.device).view(1, h, 1) * wp)  # (C, H, 1)
        self._cols = torch.arange(w, device=self.device)
        # Recorded views: the replayed parameters of every held row (sample i, view v), looked up by row.
        self._row_params = None
        if aug is not None and view_seed is not None:
            rows = np.arange(n * self.views, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
            index, view = np.divmod(rows, self.views)
            params = replayed_params(view_key(int(view_seed), index, view), aug)
            table = np.zeros((n * self.views, 3), dtype=np.int64)
            table[rows] = params
            self._row_params = torch.from_numpy(table).to(self.device)

    @property
    def epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def _epoch_plan(self):
        rows = torch.as_tensor(list(iter(self.sampler)), dtype=torch.long)
        samples = rows // self.views if self.views > 1 else rows
        params = None
        if self.data.augment is not None:
            if self._row_params is not None:
                params = self._row_params[rows.to(self.device)]
            else:
                params = torch.from_numpy(augment_params(self.seed, samples.numpy(), self.epoch,
                                                         self.data.augment))
        to = lambda t: None if t is None else t.to(self.device, non_blocking=True)  # noqa: E731
        return to(rows), to(samples), to(params)

    def cut(self, samples: torch.Tensor, params: torch.Tensor | None) -> torch.Tensor:
        """The normalised inputs of ``samples`` with crop/flip ``params`` (``[dy, dx, flip]`` rows): one gather
        from the padded uint8 store, then ``ToTensor`` / ``Normalize`` arithmetic."""
        if params is None:
            return self.data.normalise(self.data.images.index_select(0, samples))
        h, w = self._hw
        wp = w + 2 * self._pad
        dy, dx, flip = params[:, 0], params[:, 1], params[:, 2].bool()
        cols = torch.where(flip[:, None], (w - 1) - self._cols, self._cols) + dx[:, None]  # (B, W)
        start = samples * self._sample_size + dy * wp  # (B,)
        offsets = start.view(-1, 1, 1, 1) + self._channel_rows.unsqueeze(0) + cols.view(-1, 1, 1, w)
        x = self._flat[offsets]  # (B, C, H, W)
        return self.data.normalise(x)

    def __iter__(self):
        rows, samples, params = self._epoch_plan()
        b = self.batch_size
        for s in range(0, len(rows), b):
            batch_samples = samples[s:s + b]
            x = self.cut(batch_samples, None if params is None else params[s:s + b])
            yield x, self.data.targets.index_select(0, batch_samples), rows[s:s + b]


class _Ordered:
    """A fixed order (evaluation shards): no shuffling, ``set_epoch`` accepted and ignored."""

    def __init__(self, indices):
        self.indices, self.epoch = list(indices), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


def device_batches(dataset: Dataset | DeviceData, batch_size: int, *, seed: int, device, rank: int = 0,
                   world_size: int = 1, cache=None, sampler=None) -> DeviceBatches:
    """Training batches of the split ``dataset`` made on ``device``: a drop-in for ``make_loaders``'
    ``DataLoader(split, batch_size=per_worker, sampler=DistributedSampler(split, world_size, rank,
    shuffle=True, seed=seed))``, the same samples in the same order per epoch. ``batch_size`` is the per-worker
    batch (the DataLoader's). ``cache``: the run's teacher cache (a ``CachedTeacher`` with ``wants_batch``):
    batches carry its row ids and, for recorded views, the recorded crop/flip of each row, from the rows'
    keys. ``sampler``: the order to use instead of that ``DistributedSampler`` (anything with ``set_epoch``,
    ``__len__`` and ``__iter__`` over split indices, or row ids with a cache). Raises
    :class:`NotOnDeviceError` when the split cannot go on the device (:func:`device_refusal` tells first)."""
    from kdray.data.views import cached_train_data

    split = dataset
    data = dataset if isinstance(dataset, DeviceData) else device_data(dataset)
    if sampler is None:
        sampler = DistributedSampler(_Sized(len(data)), world_size, rank, shuffle=True, seed=seed)
    views, view_seed, rows = 1, None, None
    if cache is not None:
        _train, sampler = cached_train_data(split if not isinstance(split, DeviceData) else _Sized(len(data)),
                                            cache, sampler, seed, world_size)
        if cache.view_seed is not None:
            views, view_seed = int(cache.views), int(cache.view_seed)
            samples = cache.samples().numpy()
            rows = (samples[:, None] * views + np.arange(views)[None, :]).reshape(-1)
        elif data.augment is not None:
            raise NotOnDeviceError("a fixed-view teacher cache with a random training transform")
    return DeviceBatches(data, sampler, batch_size, seed, device, views, view_seed, rows)


def device_eval_batches(dataset: Dataset | DeviceData, batch_size: int = 256, *, device, rank: int = 0,
                        world_size: int = 1) -> DeviceBatches:
    """Evaluation batches on ``device`` of this rank's shard (samples ``rank, rank + world_size, ...``, in
    order, as ``make_loaders``' ``_shard``); the split's transform must be deterministic."""
    data = dataset if isinstance(dataset, DeviceData) else device_data(dataset)
    if data.augment is not None:
        raise NotOnDeviceError("an evaluation split with a random transform")
    order = _Ordered(range(rank, len(data), world_size) if world_size > 1 else range(len(data)))
    return DeviceBatches(data, order, batch_size, 0, device)


class _Sized:
    """Stands for a dataset where only its length is read (DistributedSampler)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n
