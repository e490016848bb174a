"""Datasets whose inputs are a mapping of modalities (paired samples seen two ways), and per-modality views.

A sample of such a dataset is ``({modality: tensor, ...}, target)``; its modalities are the mapping's keys
(:func:`modalities`). The cross-modal scheme trains a teacher on one modality and a student on another of the
same samples; stages that read one modality get :func:`view_splits` (every split as that modality's plain
tensors: a tensor-backed view, so the device pipeline can still hold it).

Built in: ``digits_two_views``, scikit-learn's digits as ``{"image": 1x8x8, "profile": 16}``, where the profile is
the image's 8 row means followed by its 8 column means (:func:`profiles`), split exactly as ``digits`` is.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from kdray.data.device import split_base
from kdray.data.registry import DatasetSplits, IndexedDataset, register_dataset, split_indices, subsample


class PairedTensors(Dataset):
    """Samples ``({name: tensors[name][i], ...}, targets[i])``: every modality a tensor of the same length."""

    def __init__(self, tensors: dict[str, torch.Tensor], targets: torch.Tensor):
        lengths = {name: len(t) for name, t in tensors.items()}
        if not tensors or any(n != len(targets) for n in lengths.values()):
            raise ValueError(f"every modality needs one row per target ({len(targets)}), got {lengths}")
        self.tensors, self.targets = dict(tensors), targets

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return {name: t[i] for name, t in self.tensors.items()}, self.targets[i]


def profiles(images: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` images -> ``(N, C * (H + W))``: per channel the ``H`` row means, then the ``W`` column means."""
    return torch.cat([images.mean(dim=-1), images.mean(dim=-2)], dim=-1).flatten(1)


def modalities(dataset: Dataset) -> list[str] | None:
    """The modality names of a split whose inputs are a mapping (from its first sample), else ``None``."""
    if len(dataset) == 0:
        return None
    x = dataset[0][0]
    return [str(k) for k in x] if isinstance(x, Mapping) else None


class ModalityView(Dataset):
    """``(x, y, i) -> (x[name], y, i)`` of a mapping-input split (the generic view; see :func:`modality_view`)."""

    def __init__(self, base: Dataset, name: str):
        self.base, self.name = base, name

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y, index = self.base[i]
        return x[self.name], y, index


def modality_view(dataset: Dataset, name: str) -> Dataset:
    """Split ``dataset`` (``(inputs, y, index)`` items, inputs a mapping) with only modality ``name`` as inputs,
    same indices. A split of :class:`PairedTensors` becomes ``IndexedDataset(Subset(TensorDataset))`` over that
    modality's tensor (what the device pipeline reads) when the modality is an image (``C x H x W``; the device
    pipeline holds images only); any other a :class:`ModalityView` (read per sample)."""
    base, indices = split_base(dataset)
    if isinstance(base, PairedTensors) and base.tensors[name].dim() == 4:
        view = TensorDataset(base.tensors[name], base.targets)
        return IndexedDataset(view if indices is None else Subset(view, indices.tolist()))
    return ModalityView(dataset, name)


def view_splits(splits: DatasetSplits, name: str) -> DatasetSplits:
    """``splits`` with every split reduced to modality ``name`` (its ``input_shape`` that modality's)."""
    train = modality_view(splits.train, name)
    return replace(splits, train=train, val=modality_view(splits.val, name), test=modality_view(splits.test, name),
                   input_shape=tuple(train[0][0].shape))


def split_targets(dataset: Dataset) -> torch.Tensor:
    """The targets of a split in index order (read from the tensors where the split is tensor-backed)."""
    base, indices = split_base(dataset)
    targets = getattr(base, "targets", None)
    if isinstance(targets, torch.Tensor):
        return (targets if indices is None else targets[torch.from_numpy(indices)]).long()
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)


@register_dataset("digits_two_views", "digits paired in two modalities: {image: 1x8x8, profile: 8 row + 8 column "
                                      "means}; the split of `digits`")
def digits_two_views(root=None, seed: int = 0, train_fraction: float = 1.0, val_fraction: float = 0.2,
                     test_fraction: float = 0.2) -> DatasetSplits:
    """The ``digits`` images (scaled to [0, 1], the same deterministic split for the same options) with their
    row/column intensity profiles (:func:`profiles`) as a second modality."""
    import hashlib

    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    full = PairedTensors({"image": images, "profile": profiles(images)}, torch.tensor(bunch.target, dtype=torch.long))
    tr, va, te = split_indices(len(full), (val_fraction, test_fraction), seed)
    train = subsample(Subset(full, tr), train_fraction, seed)
    fp = hashlib.sha256(repr(("digits_two_views", seed, train_fraction, val_fraction, test_fraction)).encode())
    return DatasetSplits(IndexedDataset(train), IndexedDataset(Subset(full, va)), IndexedDataset(Subset(full, te)),
                         10, (1, 8, 8), fp.hexdigest()[:16], [str(c) for c in bunch.target_names])
