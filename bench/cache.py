"""Cached-teacher KD step vs live-teacher KD step vs plain student step: resnet56 -> resnet20, CIFAR-shaped batches.

The cached teacher is what ``teacher.cache`` gives a training stage: a CIFAR-100-sized ``[50000, 100]`` table
of teacher logits, looked up by the batch's (shuffled) sample indices. Steps are timed round-robin
(``time_interleaved``) so that a shared machine's load hits all three alike. Goal: cached within 1.05x of
the plain student step. Also reports how long reading such a cache from Parquet takes.
Run: ``python bench/cache.py [--device cuda] [--batch 64] [--repeats 10] [--threads N]``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import header, time_interleaved  # noqa: E402

from kdray.algorithms import create_method  # noqa: E402
from kdray.algorithms.base import Batch  # noqa: E402
from kdray.algorithms.cached_teacher import CachedTeacher  # noqa: E402
from kdray.algorithms.distiller import Distiller, Teacher  # noqa: E402
from kdray.models import create_model  # noqa: E402


def parquet_read_seconds(logits: torch.Tensor, float16: bool) -> tuple[float, float]:
    """Write ``logits`` as a cache file (one pyarrow table) and time reading it back into a CachedTeacher."""
    import pyarrow.parquet as pq

    from kdray.orchestrator import teacher_cache as tc

    n, classes = logits.shape
    manifest = {"format": tc.FORMAT_VERSION, "dataset": {"size": n, "num_classes": classes},
                "logits": {"stored": "full", "topk": None, "dtype": "float16" if float16 else "float32"}}
    with tempfile.TemporaryDirectory() as out:
        table = tc.outputs_table(torch.arange(n).numpy(), logits, None, float16)
        pq.write_table(table.replace_schema_metadata({tc.META_KEY: json.dumps(manifest).encode()}),
                       os.path.join(out, tc.CACHE_FILE))
        size = os.path.getsize(os.path.join(out, tc.CACHE_FILE)) / 2**20
        start = time.perf_counter()
        tc.load_cached_teacher(out, manifest)
        return time.perf_counter() - start, size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--teacher", default="resnet56")
    parser.add_argument("--student", default="resnet20")
    parser.add_argument("--samples", type=int, default=50_000, help="rows of the cached table (CIFAR train set)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    classes = 100
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, classes, (args.batch,), device=device)
    idx = torch.randperm(args.samples)[: args.batch].to(device)  # a shuffled batch's sample indices
    batch = Batch(x, y, idx)

    plain = Distiller(create_model(args.student, classes)).to(device)
    live_kd = Distiller(create_model(args.student, classes), [create_method("kd", alpha=0.9, temperature=4.0)])
    cached_kd = Distiller(create_model(args.student, classes), [create_method("kd", alpha=0.9, temperature=4.0)])
    live_kd, cached_kd = live_kd.to(device), cached_kd.to(device)
    teacher = Teacher(create_model(args.teacher, classes)).to(device)
    cache = CachedTeacher(torch.randn(args.samples, classes) * 4).to(device)
    opts = {name: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
            for name, m in (("plain", plain), ("live", live_kd), ("cached", cached_kd))}

    def step(name, distiller, teacher_out):
        _, losses = distiller(batch, teacher_out)
        opts[name].zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opts[name].step()

    fns = {
        "plain": lambda: step("plain", plain, None),
        "live": lambda: step("live", live_kd, teacher(x)),
        "cached": lambda: step("cached", cached_kd, cache(batch)),  # what TrainLoop does for wants_batch
    }
    t = time_interleaved(fns, device, repeats=args.repeats)
    read32, mb32 = parquet_read_seconds(torch.randn(args.samples, classes), float16=False)
    read16, mb16 = parquet_read_seconds(torch.randn(args.samples, classes), float16=True)

    print(header(f"Teacher-output cache: {args.teacher} -> {args.student}, batch {args.batch}, {device}"))
    print("| step | ms / step | images / s |\n|---|---|---|")
    for name, label in (("plain", "plain student step (CE)"), ("live", "KD step, live teacher forward"),
                        ("cached", "KD step, cached teacher logits")):
        print(f"| {label} | {t[name] * 1e3:.1f} | {args.batch / t[name]:.0f} |")
    print(f"\ncached / plain = {t['cached'] / t['plain']:.3f}  (goal <= 1.05)")
    print(f"live / plain   = {t['live'] / t['plain']:.3f}")
    print(f"live / cached  = {t['live'] / t['cached']:.3f}  (speed-up of training from the cache)")
    print(f"\nreading a {args.samples} x {classes} cache into an index-addressed tensor: float32 {read32 * 1e3:.0f} ms "
          f"({mb32:.1f} MiB), float16 {read16 * 1e3:.0f} ms ({mb16:.1f} MiB)")


if __name__ == "__main__":
    main()
