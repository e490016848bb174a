"""DataLoader options of the per-sample path (PIL decode and transforms in worker processes).

:func:`loader_options` gives ``num_workers`` / ``persistent_workers`` / ``pin_memory`` (and
``prefetch_factor``) for a training or evaluation ``DataLoader``:

- workers: the requested count, or by default the CPUs this process may run on (its affinity mask, or the
  ``cpus`` the orchestrator allots, e.g. ``ray.cpus_per_worker``) minus one for the training process itself,
  capped at ``MAX_DEFAULT_WORKERS``; 0 on a one-CPU worker. The CIFAR per-sample path costs ~160-176 us a sample
  (~6,000 images/s a core), so a GPU step needs several.
- ``persistent_workers`` when there are workers, except with a random training transform: a worker's random
  generator is seeded once, when the workers start, so persistent workers would give a stage resumed at epoch k
  other augmentations than the uninterrupted run (fresh workers each epoch are seeded from the main process's
  generator, which the checkpoint restores). Recorded views (:class:`~kdray.data.views.ViewDataset`) seed every
  sample from its key, so they are safe to keep.
- ``pin_memory`` on CUDA only.
"""
from __future__ import annotations

import os

import torch

#: The default worker count's cap: beyond it the main process's collation and the host-to-device copy limit.
MAX_DEFAULT_WORKERS = 8


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask where the OS has one, else ``os.cpu_count()``."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_loader_workers(cpus: int | None = None, cap: int = MAX_DEFAULT_WORKERS) -> int:
    """``min(cap, cpus - 1)``, at least 0: one CPU stays with the training process."""
    cpus = available_cpus() if cpus is None else int(cpus)
    return max(0, min(int(cap), cpus - 1))


def has_random_transform(dataset) -> bool:
    """Whether a split's transform chain (through IndexedDataset / Subset / ConcatDataset wrappers) holds a
    ``Random*`` torchvision transform drawn from the workers' generators. Recorded views (``ViewDataset``) seed
    each sample from its key: not random in this sense."""
    from kdray.data.views import ViewDataset

    stack, seen = [dataset], set()
    while stack:
        ds = stack.pop()
        if ds is None or id(ds) in seen:
            continue
        seen.add(id(ds))
        if isinstance(ds, ViewDataset):
            continue
        if _is_random(getattr(ds, "transform", None)):
            return True
        stack += [getattr(ds, "base", None), getattr(ds, "dataset", None), *getattr(ds, "datasets", [])]
    return False


def _is_random(transform) -> bool:
    if transform is None:
        return False
    if type(transform).__name__.startswith("Random"):
        return True
    children = list(getattr(transform, "transforms", None) or [])
    if isinstance(transform, torch.nn.Module):
        children += list(transform.children())
    return any(_is_random(c) for c in children)


def loader_options(device, requested_workers: int | None = None, *, cpus: int | None = None,
                   random_transform: bool = False) -> dict:
    """Keyword arguments for ``DataLoader`` on the per-sample path. ``requested_workers``: ``None`` for the
    default (:func:`default_loader_workers` of ``cpus``, default the affinity mask), else that count.
    ``random_transform``: the dataset's transform is random (:func:`has_random_transform`): then workers are
    not kept across epochs, so resume stays exact."""
    device = torch.device(device)
    workers = default_loader_workers(cpus) if requested_workers is None else int(requested_workers)
    if workers < 0:
        raise ValueError(f"loader workers must be >= 0, got {workers}")
    options = {"num_workers": workers, "pin_memory": device.type == "cuda",
               "persistent_workers": workers > 0 and not random_transform}
    if workers > 0:
        options["prefetch_factor"] = 4
    return options
