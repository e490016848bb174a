"""Image sets stored as Parquet: what DeepInversion synthesises (or any tensor images a user makes), read back as
the training split of any scheme.

One row per image: ``image`` (the float32 tensor's bytes, C-order), ``label`` (int64); the file's schema
metadata holds the shape and the class names, so a reader needs no side file. Writes go to a temporary name and
are renamed into place, so a killed writer never leaves a half file. The validation and test splits are not in the
file: a synthetic set has none worth testing on, so ``eval_dataset`` names the registered dataset whose real
val/test splits measure the student (its classes must be the file's).
"""
from __future__ import annotations

import json
import os

import torch
from torch.utils.data import TensorDataset

from kdray.data.parquet_io import write_parquet_atomically
from kdray.data.registry import DatasetFilesMissingError, DatasetSplits, IndexedDataset, build_datasets, register_dataset

SCHEMA_KEY = b"kdray.images"


def write_image_parquet(path: str, images: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> str:
    """Write ``images`` (N, C, H, W) and ``labels`` (N,) to ``path`` atomically; returns ``path``."""
    import pyarrow as pa

    if images.ndim != 4 or len(images) != len(labels):
        raise ValueError(f"image parquet needs images (N, C, H, W) and N labels, got {tuple(images.shape)} and "
                         f"{tuple(labels.shape)}")
    x = images.detach().cpu().float().contiguous()
    table = pa.table({"image": pa.array([row.numpy().tobytes() for row in x], pa.binary()),
                      "label": pa.array(labels.detach().cpu().long().numpy())})
    meta = {"shape": list(x.shape[1:]), "classes": [str(c) for c in classes]}
    return write_parquet_atomically(table, path, SCHEMA_KEY, meta)


def read_image_parquet(path: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(images, labels, classes)`` of a file written by :func:`write_image_parquet`."""
    import numpy as np
    import pyarrow.parquet as pq

    if not os.path.isfile(path):
        raise DatasetFilesMissingError(f"image parquet {path} does not exist; write it first (e.g. a "
                                       f"deep_inversion stage) or fix data.root")
    table = pq.read_table(path)
    raw = (table.schema.metadata or {}).get(SCHEMA_KEY)
    if raw is None:
        raise DatasetFilesMissingError(f"{path} is a Parquet file but not a kdray image set (no {SCHEMA_KEY.decode()} "
                                       f"schema metadata); write it with kdray.data.write_image_parquet")
    meta = json.loads(raw)
    flat = np.stack([np.frombuffer(b, dtype=np.float32) for b in table.column("image").to_pylist()])
    images = torch.from_numpy(flat.copy()).view(-1, *meta["shape"])
    return images, torch.from_numpy(table.column("label").to_numpy().copy()), meta["classes"]


@register_dataset("image_parquet", "images stored as Parquet (a DeepInversion set) as the training split; val/test "
                                   "from data.options.eval_dataset")
def image_parquet(root=None, seed: int = 0, eval_dataset: str = "digits", eval_options: dict | None = None):
    """``root``: the Parquet file. Val/test: the real splits of ``eval_dataset`` (with ``eval_options``)."""
    if root is None:
        raise DatasetFilesMissingError("dataset 'image_parquet' needs data.root: the Parquet file of images")
    images, labels, classes = read_image_parquet(root)
    real = build_datasets(eval_dataset, seed=seed, **(eval_options or {}))
    if list(real.classes) != list(classes) or tuple(real.input_shape) != tuple(images.shape[1:]):
        raise ValueError(f"image parquet {root} holds classes {classes[:5]}... of shape {tuple(images.shape[1:])}, "
                         f"but eval_dataset {eval_dataset!r} has {real.classes[:5]}... of shape {real.input_shape}; "
                         f"evaluate on the dataset the images were made for")
    fingerprint = f"image_parquet:{os.path.getsize(root)}:{os.path.getmtime(root)}:{real.fingerprint}"
    return DatasetSplits(IndexedDataset(TensorDataset(images, labels)), real.val, real.test, real.num_classes,
                         tuple(images.shape[1:]), fingerprint, classes)
