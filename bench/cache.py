"""Cached-teacher KD step vs live-teacher KD step vs plain student step: resnet56 -> resnet20, CIFAR-shaped batches.

The cached teacher is what ``teacher.cache`` gives a training stage: a CIFAR-100-sized ``[50000, 100]`` table
of teacher logits, looked up by the batch's (shuffled) sample indices. Steps are timed round-robin
(``time_interleaved``) so that a shared machine's load hits all three alike. Goal: cached within 1.05x of
the plain student step. Also reports how long reading such a cache from Parquet takes and what verifying its
recorded SHA-256 adds to every open (against a CRC-32 of the same bytes), the rows and bytes one
data-parallel worker holds when it reads only its shard (``--views`` recorded views per sample, ``--world``
workers) against the whole cache, and what rebuilding a recorded view from its key costs per sample
(CIFAR-style random crop + flip) against drawing a fresh augmentation.
Run: ``python bench/cache.py [--device cuda] [--batch 64] [--repeats 10] [--threads N] [--views 4] [--world 2]``.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import header, step_parser, time_interleaved  # noqa: E402

from kdray.algorithms import create_method  # noqa: E402
from kdray.algorithms.base import Batch  # noqa: E402
from kdray.algorithms.cached_teacher import CachedTeacher  # noqa: E402
from kdray.algorithms.distiller import Distiller, Teacher  # noqa: E402
from kdray.models import create_model  # noqa: E402


def parquet_read_seconds(logits: torch.Tensor, float16: bool, repeats: int = 3) -> dict:
    """Write ``logits`` as a cache (``save_cache``: Parquet + manifest.json with the file's SHA-256) and time, best
    of ``repeats``: reading it back into a CachedTeacher, verifying the checksum as every open does
    (``read_manifest``), and a CRC-32 of the same bytes (the cheaper checksum that was not chosen)."""
    import zlib

    from kdray.orchestrator import cache_store as cs
    from kdray.orchestrator import teacher_cache as tc

    n, classes = logits.shape
    manifest = {"format": tc.FORMAT_VERSION, "dataset": {"size": n, "num_classes": classes},
                "logits": {"stored": "full", "topk": None, "dtype": "float16" if float16 else "float32"}}
    with tempfile.TemporaryDirectory() as out:
        tc.save_cache(out, tc.outputs_table(torch.arange(n).numpy(), logits, None, float16), manifest)
        file = os.path.join(out, tc.CACHE_FILE)

        def crc32():
            with open(file, "rb") as fh:
                zlib.crc32(fh.read())

        times = {}
        for name, fn in (("read", lambda: cs.load_cached_teacher(out, manifest)),
                         ("verify", lambda: tc.read_manifest(out)), ("crc32", crc32)):
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - start)
            times[name] = best
        return {**times, "mb": os.path.getsize(file) / 2**20}


def shard_memory(samples: int, classes: int, views: int, world: int) -> dict:
    """Rows and logits bytes held by the whole cache vs by each worker's shard (what a sharded run holds)."""
    import numpy as np

    from kdray.orchestrator import cache_store as cs
    from kdray.orchestrator import teacher_cache as tc

    index = np.repeat(np.arange(samples), views)
    view = np.tile(np.arange(views), samples)
    table = tc.outputs_table(index, torch.randn(samples * views, classes), None, False, view,
                             np.zeros(samples * views, dtype=np.int64))
    manifest = {"dataset": {"size": samples, "num_classes": classes},
                "views": {"kind": "recorded", "count": views, "seed": 0}, "logits": {"stored": "full"}}
    full = cs.teacher_from_table(table, manifest, "bench")
    shards = [cs.teacher_from_table(cs.keep_shard(table, r, world), manifest, "bench", shard=(r, world))
              for r in range(world)]
    return {"full_rows": full.num_rows, "full_mb": full.logits.nbytes / 2**20,
            "shard_rows": [s.num_rows for s in shards],
            "shard_mb": [(s.logits.nbytes + s.rows.nbytes) / 2**20 for s in shards]}


def view_rebuild_us(views: int, repeats: int = 300) -> tuple[float, float]:
    """Microseconds per sample: a fresh random augmentation vs rebuilding a recorded view from its key."""
    from torchvision import datasets, transforms

    from kdray.data.registry import IndexedDataset
    from kdray.data.views import ViewDataset

    tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.25,) * 3)])
    base = IndexedDataset(datasets.FakeData(repeats, (3, 32, 32), 100, transform=tf))
    recorded = ViewDataset(base, views, seed=0)
    out = []
    for fn in (lambda i: base[i], lambda i: recorded[i * views + i % views]):
        fn(0)
        start = time.perf_counter()
        for i in range(repeats):
            fn(i)
        out.append((time.perf_counter() - start) / repeats * 1e6)
    return out[0], out[1]


def main() -> None:
    parser = step_parser()
    parser.add_argument("--samples", type=int, default=50_000, help="rows of the cached table (CIFAR train set)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--views", type=int, default=4, help="recorded views per sample (shard memory figure)")
    parser.add_argument("--world", type=int, default=2, help="data-parallel workers (shard memory figure)")
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
    r32 = parquet_read_seconds(torch.randn(args.samples, classes), float16=False)
    r16 = parquet_read_seconds(torch.randn(args.samples, classes), float16=True)

    print(header(f"Teacher-output cache: {args.teacher} -> {args.student}, batch {args.batch}, {device}"))
    print("| step | ms / step | images / s |\n|---|---|---|")
    for name, label in (("plain", "plain student step (CE)"), ("live", "KD step, live teacher forward"),
                        ("cached", "KD step, cached teacher logits")):
        print(f"| {label} | {t[name] * 1e3:.1f} | {args.batch / t[name]:.0f} |")
    print(f"\ncached / plain = {t['cached'] / t['plain']:.3f}  (goal <= 1.05)")
    print(f"live / plain   = {t['live'] / t['plain']:.3f}")
    print(f"live / cached  = {t['live'] / t['cached']:.3f}  (speed-up of training from the cache)")
    print(f"\nreading a {args.samples} x {classes} cache into an index-addressed tensor: float32 "
          f"{r32['read'] * 1e3:.0f} ms ({r32['mb']:.1f} MiB), float16 {r16['read'] * 1e3:.0f} ms ({r16['mb']:.1f} MiB)")
    for label, r in (("float32", r32), ("float16", r16)):
        print(f"verifying its SHA-256 on open ({label}): {r['verify'] * 1e3:.0f} ms = {r['verify'] / r['read']:.2f}x "
              f"the read (CRC-32 of the same bytes: {r['crc32'] * 1e3:.0f} ms)")

    mem = shard_memory(args.samples, classes, args.views, args.world)
    print(f"\nsharded reading, {args.samples} samples x {args.views} recorded views x {classes} classes, "
          f"{args.world} workers: whole cache {mem['full_rows']} rows ({mem['full_mb']:.1f} MiB float32); per worker "
          f"{mem['shard_rows']} rows ({', '.join(f'{m:.1f}' for m in mem['shard_mb'])} MiB incl. row ids) = "
          f"{max(mem['shard_rows']) / mem['full_rows']:.3f} of the rows")
    fresh, rebuilt = view_rebuild_us(args.views)
    print(f"CIFAR-style augmentation per sample: fresh random view {fresh:.0f} us, recorded view rebuilt from its "
          f"key {rebuilt:.0f} us ({rebuilt / fresh:.2f}x)")


if __name__ == "__main__":
    main()