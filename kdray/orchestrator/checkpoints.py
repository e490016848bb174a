"""Where a job's checkpoints go: a local directory (in-process runs) or Ray Train's storage.

Both write atomically: locally a temp file is renamed over the old one; on Ray the checkpoint is
registered only after Ray has persisted the whole directory. A checkpoint is one file, ``state.pt``,
that ``torch.load(weights_only=True)`` reads (tensors, numbers, strings, dicts only): the payload of a
:class:`~kdray.orchestrator.run_dir.Checkpoint` (runners write and read through that dataclass).
"""
from __future__ import annotations

import os
import tempfile

import torch

from kdray.orchestrator.run_dir import STATE_FILE, RunDir, write_atomic


def save_atomic(payload: dict, path: str) -> None:
    """Write ``payload`` to ``path`` so a crash leaves either the old or the new file, never half of one."""
    write_atomic(path, lambda fh: torch.save(payload, fh), suffix=".pt")


def load_state(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


class LocalCheckpoints:
    """In-process runs: ``<run_dir>/checkpoint/state.pt``."""

    def __init__(self, run_dir: str):
        self.path = RunDir(run_dir, "").checkpoint_file()

    def latest(self) -> dict | None:
        return load_state(self.path) if os.path.exists(self.path) else None

    def save(self, payload: dict, metrics: dict) -> None:
        save_atomic(payload, self.path)


class RayCheckpoints:
    """Inside Ray Train: every rank reports each time (it is a barrier); rank 0 attaches the checkpoint."""

    def __init__(self, rank: int):
        self.rank = rank

    def latest(self) -> dict | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return load_state(os.path.join(folder, STATE_FILE))

    def save(self, payload: dict, metrics: dict) -> None:
        import ray.train

        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
        if self.rank != 0:
            ray.train.report(scalars)
            return
        with tempfile.TemporaryDirectory() as folder:
            torch.save(payload, os.path.join(folder, STATE_FILE))
            ray.train.report(scalars, checkpoint=ray.train.Checkpoint.from_directory(folder))
