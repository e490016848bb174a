"""Dataset registry: ``build_datasets(name, ...)`` returns train/val/test splits of ``(x, y, index)``."""
from __future__ import annotations

import difflib
import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils.data import Dataset, Subset

_DATASETS: dict[str, Callable[..., "DatasetSplits"]] = {}
_DESCRIPTIONS: dict[str, str] = {}


class UnknownDatasetError(ValueError):
    pass


class DatasetFilesMissingError(FileNotFoundError):
    pass


class EmptySplitError(ValueError):
    """A dataset whose options leave no training samples (a model cannot be built or trained on none)."""


class UnreadableFileError(ValueError):
    """A dataset file that the dataset's loader cannot read (e.g. a non-image in an ImageFolder class)."""


class IndexedDataset(Dataset):
    """Wraps a ``(x, y)`` dataset so items are ``(x, y, index)``, the index into this split."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i][:2]
        return x, int(y), i


@dataclass
class DatasetSplits:
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    # Identifies the data and its transforms, so a teacher-output cache can refuse a mismatch.
    fingerprint: str
    # Class names in label order (label i is classes[i]); the student's output order. Default "0".."n-1".
    classes: list[str] = field(default_factory=list)
    # Checks the dataset's files up front (raises UnreadableFileError naming the file); preflight runs it once
    # on the driver, so a bad file fails before training instead of in a batch mid-run.
    check_files: Callable[[], None] | None = None
    # The whole graph, for a dataset of graph nodes (kdray.data.graph.Graph): the splits above are its nodes'
    # feature rows; graph schemes read the edges from here.
    graph: Any = None
    # Token ids back to text, for a language-model corpus (kdray.data.lm_corpus): its classes are the vocabulary.
    decode: Callable[[Any], str] | None = None
    # The training split followed by unlabelled rows (target -100), for a dataset with a transfer set
    # (``data.options.labelled`` of text classification): the stages a teacher teaches train on it (Hinton et
    # al.'s transfer set; Tang et al. 2019), while the teachers and the label-only students train on ``train``.
    transfer_train: Dataset | None = None

    def __post_init__(self):
        self.classes = [str(c) for c in self.classes] or [str(i) for i in range(self.num_classes)]
        if len(self.classes) != self.num_classes:
            raise ValueError(f"{len(self.classes)} class names for {self.num_classes} classes")


def register_dataset(name: str, description: str):
    def wrap(fn):
        _DATASETS[name] = fn
        _DESCRIPTIONS[name] = description
        return fn

    return wrap


def list_datasets() -> dict[str, str]:
    _ensure_builtin()
    return dict(sorted(_DESCRIPTIONS.items()))


def _ensure_builtin():
    """Import the built-in datasets' module by name (it registers them): the registry depends on no dataset."""
    importlib.import_module(f"{__package__}.builtin")
    importlib.import_module(f"{__package__}.image_parquet")
    importlib.import_module(f"{__package__}.graph")
    importlib.import_module(f"{__package__}.two_views")
    importlib.import_module(f"{__package__}.lm_corpus")
    importlib.import_module(f"{__package__}.text")  # transformers only when a text dataset is built
    importlib.import_module(f"{__package__}.movie_reviews")


def build_datasets(name: str, *, root: str | None = None, seed: int = 0, **options) -> DatasetSplits:
    _ensure_builtin()
    if name not in _DATASETS:
        close = difflib.get_close_matches(name, list(_DATASETS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownDatasetError(f"unknown dataset {name!r}{hint}; allowed: {', '.join(sorted(_DATASETS))}")
    if root is not None:
        root = os.path.abspath(os.path.expanduser(root))
    splits = _DATASETS[name](root=root, seed=seed, **options)
    if len(splits.train) == 0:
        where = f" under {root}" if root else ""
        raise EmptySplitError(f"dataset {name!r}{where} has no training samples with options {options or {}}; give "
                              f"it some: a larger data.options.train_fraction, smaller val_fraction + test_fraction, "
                              f"or files in its training folder")
    return splits


def split_indices(n: int, fractions: tuple[float, float], seed: int) -> tuple[list[int], list[int], list[int]]:
    """Deterministic shuffled split of ``range(n)`` into train/val/test by (val, test) fractions."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val, n_test = int(round(n * fractions[0])), int(round(n * fractions[1]))
    return perm[n_val + n_test :], perm[:n_val], perm[n_val : n_val + n_test]


def subsample(dataset: Dataset, fraction: float, seed: int) -> Dataset:
    """A fixed random ``fraction`` of ``dataset`` (reduced-data regimes, where KD matters most)."""
    if fraction >= 1.0:
        return dataset
    n = len(dataset)
    keep = max(1, int(round(n * fraction)))
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1)).tolist()[:keep]
    return Subset(dataset, sorted(idx))
