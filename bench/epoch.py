"""A whole training epoch of resnet56 -> resnet20 KD on CIFAR-shaped data, data path included.

The data is a CIFAR-10-format folder of ``--images`` random uint8 32x32x3 images written to a temp dir and read
by torchvision's CIFAR10 (``build_datasets("cifar10")``: uint8 -> ``Image.fromarray`` -> RandomCrop(32, 4) ->
flip -> ToTensor -> Normalize; torchvision's md5 check is skipped, the files being made here). One epoch of KD
steps (teacher forward + student step with ``kd``) for each pipeline:

- ``per-sample, 0 workers``: ``DataLoader`` in the training process (as ``data.loader_workers: 0`` today);
- ``per-sample, N workers``: ``DataLoader`` with :func:`kdray.data.loading.loader_options` (``--workers``,
  default its CPU-based default), worker start-up included;
- ``device``: :func:`kdray.data.device.device_batches` (uint8 tensors on ``--device``, crop/flip/normalise
  in one gather per batch).

Baseline, measured in the same run: the same number of bare KD steps, of the same batch sizes, on pre-made device
tensors. Epochs are timed round-robin (``--repeats`` rounds, medians) so load that comes and goes on a shared
machine hits every pipeline alike; each ratio is epoch time / bare steps' time, floor 1.0. Goal: device within
1.05x. Also the median batch time (data wait + step, over all rounds; robust to another process's spikes) against
the bare step's, and each data path timed alone (no steps).
Run: ``python bench/epoch.py [--device cuda] [--images 5000] [--batch 128] [--workers N] [--repeats 10]``.
"""
from __future__ import annotations

import os
import pickle
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import header, step_parser, sync  # noqa: E402

from kdray.algorithms import create_method  # noqa: E402
from kdray.algorithms.base import Batch  # noqa: E402
from kdray.algorithms.distiller import Distiller, Teacher  # noqa: E402
from kdray.data import build_datasets  # noqa: E402
from kdray.data.device import device_batches  # noqa: E402
from kdray.data.loading import loader_options  # noqa: E402
from kdray.models import create_model  # noqa: E402


def write_cifar(root: str, images: int, seed: int = 0) -> str:
    """``images`` random training images (5 equal batch files) and a small test batch, CIFAR-10's layout."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    per_file = max(1, images // 5)
    for name, n in [(f"data_batch_{i}", per_file) for i in range(1, 6)] + [("test_batch", 10)]:
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "labels": rng.integers(0, 10, n).tolist()}, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return root


def main() -> None:
    parser = step_parser()
    parser.set_defaults(batch=128)
    parser.add_argument("--images", type=int, default=2000, help="training images (CIFAR-10 has 50000)")
    parser.add_argument("--workers", type=int, default=None, help="per-sample loader workers (default: "
                        "loader_options' default from the CPUs)")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)

    import torchvision.datasets.cifar as cifar

    cifar.check_integrity = lambda *a, **k: True  # the files are made here: no md5 to match
    cifar.CIFAR10._check_integrity = lambda self: True
    tmp = tempfile.TemporaryDirectory()
    splits = build_datasets("cifar10", root=write_cifar(tmp.name, args.images))

    kd = Distiller(create_model(args.student, splits.num_classes),
                   [create_method("kd", alpha=0.9, temperature=4.0)]).to(device)
    teacher = Teacher(create_model(args.teacher, splits.num_classes)).to(device)
    opt = torch.optim.SGD(kd.parameters(), lr=0.05, momentum=0.9)

    def step(batch: Batch):
        _, losses = kd(batch, teacher(batch.inputs))
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()

    n = len(splits.train)
    sizes = [min(args.batch, n - s) for s in range(0, n, args.batch)]  # the epoch's batch sizes, last one short
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    premade = Batch(x, torch.randint(0, splits.num_classes, (args.batch,), device=device),
                    torch.arange(args.batch, device=device))

    def timed(batches) -> list[float]:
        """Seconds of each batch: from the previous step's end to this step's end (data wait + step)."""
        out, last = [], time.perf_counter()
        for xb, yb, ib in batches:
            step(Batch(xb.to(device, non_blocking=True), yb.to(device, non_blocking=True), ib.to(device)))
            sync(device)
            now = time.perf_counter()
            out.append(now - last)
            last = now
        return out

    def bare_epoch(_round: int) -> list[float]:  # the same steps on pre-made device tensors: the floor
        return timed((premade.inputs[:k], premade.targets[:k], premade.indices[:k]) for k in sizes)

    def run_epoch(loader, epoch: int) -> list[float]:
        loader.sampler.set_epoch(epoch)  # what TrainLoop calls
        return timed(loader)

    def per_sample(workers: int):
        sampler = torch.utils.data.DistributedSampler(splits.train, 1, 0, shuffle=True, seed=0)
        options = loader_options(device, workers, random_transform=True)  # fresh workers each epoch
        return torch.utils.data.DataLoader(splits.train, batch_size=args.batch, sampler=sampler, **options)

    workers = loader_options(device, args.workers)["num_workers"]
    start = time.perf_counter()
    on_device = device_batches(splits.train, args.batch, seed=0, device=device)
    sync(device)
    setup = time.perf_counter() - start
    epochs = {"bare KD steps (pre-made tensors)": bare_epoch,
              "per-sample, 0 workers": lambda r: run_epoch(per_sample(0), r),
              f"per-sample, {workers} workers": lambda r: run_epoch(per_sample(workers), r),
              "device": lambda r: run_epoch(on_device, r)}
    for _ in range(2):  # warm-up: allocator, kernels
        step(premade)
    times: dict[str, list[float]] = {k: [] for k in epochs}
    batch_times: dict[str, list[float]] = {k: [] for k in epochs}
    for r in range(args.repeats):  # round-robin, so load that comes and goes hits every pipeline alike
        for name, fn in epochs.items():
            sync(device)
            start = time.perf_counter()
            batch_times[name] += fn(r)
            times[name].append(time.perf_counter() - start)
    t = {k: statistics.median(v) for k, v in times.items()}
    per_batch = {k: statistics.median(v) for k, v in batch_times.items()}
    floor, floor_batch = t["bare KD steps (pre-made tensors)"], per_batch["bare KD steps (pre-made tensors)"]
    # The data path alone (batches made and moved, no step): what each pipeline adds to a step where nothing
    # overlaps it (device; per-sample with 0 workers), robust to load on a shared machine.
    data_only = {"per-sample, 0 workers": per_sample(0), f"per-sample, {workers} workers": per_sample(workers),
                 "device": on_device}
    data_t = {}
    for name, loader in data_only.items():
        runs = []
        for r in range(args.repeats):
            loader.sampler.set_epoch(r)
            start = time.perf_counter()
            for xb, yb, ib in loader:
                xb.to(device, non_blocking=True), yb.to(device, non_blocking=True), ib.to(device)
            sync(device)
            runs.append(time.perf_counter() - start)
        data_t[name] = statistics.median(runs)

    # Paired: each pipeline batch (fetch + step) right after a bare step of the full batch size, one epoch per
    # pipeline; the median of the per-pair ratios (full batches) cancels load that changes slower than a step.
    paired = {}
    for name, loader in {"per-sample, 0 workers": per_sample(0), "device": on_device}.items():
        loader.sampler.set_epoch(args.repeats)
        batches, ratios = iter(loader), []
        while True:
            sync(device)
            start = time.perf_counter()
            step(premade)
            sync(device)
            bare_s = time.perf_counter() - start
            start = time.perf_counter()
            try:
                xb, yb, ib = next(batches)
            except StopIteration:
                break
            step(Batch(xb.to(device, non_blocking=True), yb.to(device, non_blocking=True), ib.to(device)))
            sync(device)
            if len(yb) == args.batch:
                ratios.append((time.perf_counter() - start) / bare_s)
        paired[name] = statistics.median(ratios)

    print(header(f"KD epoch, data path included: {args.teacher} -> {args.student}, {n} CIFAR-shaped uint8 images, "
                 f"batch {args.batch} ({len(sizes)} steps), {device}"))
    print(f"median of {args.repeats} epochs each, round-robin; device set-up (uint8 copy + pad): {setup:.3f} s\n")
    print("| pipeline | epoch s | images / s | epoch / bare | median batch ms | median batch / bare | data path "
          "alone: s, images / s, (bare + data) / bare |\n|---|---|---|---|---|---|---|")
    for name, seconds in t.items():
        alone = (f"{data_t[name]:.3f} s, {n / data_t[name]:.0f}, {(floor + data_t[name]) / floor:.3f}"
                 if name in data_t else "-")
        print(f"| {name} | {seconds:.2f} | {n / seconds:.0f} | {seconds / floor:.3f} | {per_batch[name] * 1e3:.0f} | "
              f"{per_batch[name] / floor_batch:.3f} | {alone} |")
    print("\npaired, median of (pipeline batch / bare step just before it): "
          + ", ".join(f"{k} {v:.3f}" for k, v in paired.items()))
    print("\nfloor 1.0 (the bare KD steps of the same batch sizes); goal: device within 1.05x. 'median batch': the "
          "median over all rounds' batches of data wait + step (robust to load spikes on a shared machine; worker "
          "start-up is in the epoch time, not in it). The last column adds the data path, timed alone, to the bare "
          "steps: the ratio where nothing overlaps it.")
    tmp.cleanup()


if __name__ == "__main__":
    main()
