"""Datasets by name. Every dataset yields ``(input, target, index)``: contrastive methods and the
teacher-output cache need the sample index from the start. Training batches come from a per-sample
``DataLoader`` (:func:`loader_options`) or, for splits that fit in memory, from the device pipeline
(:func:`device_batches`, :func:`device_refusal`)."""
from kdray.data.collate import collate_batch
from kdray.data.class_pairs import ClassPairBatchSampler
from kdray.data.device import (
    NotOnDeviceError,
    can_use_device_pipeline,
    device_batches,
    device_eval_batches,
    device_refusal,
)
from kdray.data.image_parquet import read_image_parquet, write_image_parquet
from kdray.data.loading import has_random_transform, loader_options
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
    "ClassPairBatchSampler",
    "DatasetFilesMissingError",
    "DatasetSplits",
    "IndexedDataset",
    "NotOnDeviceError",
    "UnknownDatasetError",
    "build_datasets",
    "collate_batch",
    "read_image_parquet",
    "write_image_parquet",
    "can_use_device_pipeline",
    "device_batches",
    "device_eval_batches",
    "device_refusal",
    "has_random_transform",
    "list_datasets",
    "loader_options",
    "register_dataset",
]
