"""The CRD protocol's KD run (resnet32x4 -> resnet8x4, batch 64, SGD 0.05, CIFAR-100-shaped data with CIFAR's
augmentation) as a short smoke run through ``kdray.distill`` on one Ray Train worker (``--workers``), to project the time of
the real 240-epoch run: images/s per training epoch and ``240 x epoch time + start-up``.

The data is torchvision FakeData shaped like CIFAR-100 (50,000 x 3 x 32 x 32, 100 classes; ``--images`` for
less), the teacher a randomly initialised resnet32x4 saved as a checkpoint (its accuracy is not the point:
its forward costs what a trained one costs). ``--precision`` / ``--compile`` / ``--pipeline`` are the job's
``train.precision``, ``train.compile``, ``data.pipeline``. The compass goal on one H100/H200: 240 epochs in
15 minutes, i.e. >= 13,300 images/s including the teacher forward.

Run: ``python bench/crd_protocol.py [--device cuda] [--epochs 3] [--precision bf16] [--compile]``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import header  # noqa: E402

import kdray  # noqa: E402
from kdray.models import create_model  # noqa: E402

PROTOCOL_EPOCHS = 240


def job(folder: str, args) -> dict:
    teacher = os.path.join(folder, "resnet32x4.pt")
    torch.save(create_model("resnet32x4", 100).state_dict(), teacher)
    return {
        "name": "crd-protocol", "output_dir": folder, "seeds": [0], "baseline": False,
        "data": {"name": "fake", "pipeline": args.pipeline,
                 "options": {"size": args.images, "num_classes": 100, "image_size": 32, "augment": True}},
        "teacher": {"model": "resnet32x4", "checkpoint": teacher},
        "student": {"model": "resnet8x4"},
        "methods": [{"name": "kd", "temperature": 4.0}],
        "train": {"epochs": args.epochs, "batch_size": 64, "lr": 0.05, "optimizer": "sgd", "momentum": 0.9,
                  "weight_decay": 5e-4, "schedule": "step", "milestones": [150, 180, 210], "gamma": 0.1,
                  "precision": args.precision, "compile": args.compile, "channels_last": args.channels_last},
        "ray": {"num_workers": args.workers, "use_gpu": args.device == "cuda",
                "cpus_per_worker": max(1, (os.cpu_count() or 2) - 1)},
        "checkpoint": {"every_epochs": 1000},
        "mlflow": {"tracking_uri": f"sqlite:///{folder}/mlflow.db"},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--pipeline", default="auto", choices=["auto", "device", "per_sample"])
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (0: in this process, CPU only)")
    args = parser.parse_args()
    if args.workers == 0 and args.device == "cuda":
        parser.error("--workers 0 runs in this process on the CPU; GPUs are used through Ray Train workers")
    print(header(f"CRD protocol smoke: resnet32x4 -> resnet8x4 KD, {args.epochs} epochs of {args.images} "
                 f"CIFAR-100-shaped images, {args.device}, {args.precision}"
                 f"{', compile' if args.compile else ''}{', channels_last' if args.channels_last else ''}, "
                 f"data.pipeline={args.pipeline}"))
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        result = kdray.distill(job(folder, args), quiet=True, log=lambda msg: None)
        wall = time.perf_counter() - start
    (stage,) = result.stages
    epoch = stage["epoch_time_s"]  # mean over the run's epochs (the first includes any compile)
    startup = max(wall - epoch * args.epochs, 0.0)
    print(f"epoch {epoch:.2f}s  ({args.images / epoch:,.0f} images/s, teacher forward included); "
          f"wall {wall:.1f}s for {args.epochs} epochs (start-up ~{startup:.1f}s)")
    projected = PROTOCOL_EPOCHS * epoch * 50_000 / args.images + startup
    print(f"projected {PROTOCOL_EPOCHS}-epoch run on 50,000 images: {projected / 60:.1f} min "
          f"(goal: 15 min = 13,300 images/s)")


if __name__ == "__main__":
    main()
