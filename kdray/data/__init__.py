"""Datasets by name. Every dataset yields ``(input, target, index)``: contrastive methods and the
teacher-output cache need the sample index from the start."""
from kdray.data.registry import (
    DatasetFilesMissingError,
    DatasetSplits,
    IndexedDataset,
    UnknownDatasetError,
    build_datasets,
    list_datasets,
    register_dataset,
)

__all__ = [
    "DatasetFilesMissingError",
    "DatasetSplits",
    "IndexedDataset",
    "UnknownDatasetError",
    "build_datasets",
    "list_datasets",
    "register_dataset",
]
