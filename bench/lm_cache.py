"""LM top-k cache writing: tokens/s of the Ray Data writer
(:func:`kdray.orchestrator.lm_cache.write_lm_cache_with_ray`, 1 and 2 actors) against the in-process writer
(the teacher in this process, batch by batch, then ``write_lm_topk_parquet``), and the cache's bytes per token
for several k.

Each Ray call is timed whole: it builds its actor pool (each actor imports torch and builds the teacher), runs
the teacher, stages the parts with ``write_parquet`` and writes the one file; ``ray.init`` is timed apart, and
so is a call over one sequence per actor (its start-up), so that the table also gives tokens/s after start-up.
Writers are timed round-robin (after one in-process warm-up call) so a shared machine's load hits all alike;
the ratio column is the in-process writer's time over each writer's (above 1: faster). Every Ray cache is
checked equal to the in-process one.
Tiny GPT-style teacher (:class:`kdray.models.causal_lm.TinyCausalLM`), random tokens.
Run: ``python bench/lm_cache.py [--sequences 64] [--length 128] [--vocab 4096] [--k 32] [--actors 1 2]``.

Measured here (2 shared cores, load average 25-45 from other jobs: wall times are noisy, ratios indicative only),
teacher 4x128, vocab 4096, k 32, length 128, 1 thread each::

    writer               64 seq (8k tokens)   256 seq (33k tokens)   tokens/s after start-up (8k / 33k)
    in-process           1,607 tokens/s       3,000 tokens/s         -
    Ray Data, 1 actor    186 (0.12x)          587 (0.20x)            346 / 792
    Ray Data, 2 actors   235 (0.15x)          937 (0.31x)            581 / 2,620

Start-up (a pass over one sequence per actor) 14-22 s and ``ray.init`` 36-42 s under that load. Ray Data's own
stats for the 8k-token pass: the actors' teacher batches took 0.74 s of CPU time (~11k tokens per CPU-second),
so the Ray writer's wall time here is actor start and scheduling on an oversubscribed machine (whether it
pays where actors get cores / GPUs of their own was not measured: no cluster here). Bytes per token (Ray's file
is the in-process file): k = 8: 21.8-23.6, k = 32: 85.2-87.0, k = 64: 168.9-170.2 (raw payload 6k = 48, 192,
384; fp16 full-vocabulary logits 8,192).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import header  # noqa: E402

from kdray.algorithms.lm.topk import teacher_topk  # noqa: E402
from kdray.data.lm_topk_cache import (bytes_per_token, lm_cache_fingerprint, read_lm_topk_parquet,  # noqa: E402
                                      write_lm_topk_parquet)
from kdray.models.causal_lm import tiny_causal_lm  # noqa: E402
from kdray.orchestrator.lm_cache import write_lm_cache_with_ray  # noqa: E402


def in_process(path, teacher, ids, k, temperature, batch):
    with torch.no_grad():
        parts = [teacher_topk(teacher(ids[i:i + batch]), k, temperature) for i in range(0, len(ids), batch)]
    return write_lm_topk_parquet(path, torch.cat([p.indices for p in parts]), torch.cat([p.logprobs for p in parts]),
                                 temperature=temperature, vocab_size=teacher.vocab_size,
                                 fingerprint=lm_cache_fingerprint(teacher.state_dict(), "bench", ids, k, temperature))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--teacher", default="4x128", help="layers x width")
    parser.add_argument("--k", type=int, default=32, help="k of the throughput runs")
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 32, 64], help="k values for bytes per token")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=8, help="sequences per teacher forward")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    layers, width = map(int, args.teacher.split("x"))
    knobs = {"layers": layers, "width": width, "heads": 4, "max_length": args.length}
    teacher = tiny_causal_lm(args.vocab, **knobs, seed=1).eval()
    spec, state = {"model": "causal_lm", "args": knobs}, teacher.state_dict()
    ids = torch.randint(0, args.vocab, (args.sequences, args.length), generator=torch.Generator().manual_seed(0))
    tokens = ids.numel()
    start = time.perf_counter()
    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), object_store_memory=512 * 2**20,
             include_dashboard=False, log_to_driver=False)
    init_s = time.perf_counter() - start

    def ray_writer(rows, path, actors):
        return write_lm_cache_with_ray(spec, state, rows, vocab_size=args.vocab, k=args.k, temperature=1.0, path=path,
                                       tokenizer="bench", batch_size=args.batch, concurrency=actors, overwrite=True,
                                       log=lambda line: None)

    with tempfile.TemporaryDirectory() as tmp:
        ref = os.path.join(tmp, "ref.parquet")
        writers = {"in-process": lambda: in_process(ref, teacher, ids, args.k, 1.0, args.batch)}
        for n in args.actors:
            writers[f"Ray Data, {n} actor(s)"] = (lambda n=n: ray_writer(ids, os.path.join(tmp, f"ray{n}.parquet"), n))
            # the same pass over one sequence per actor: what a call costs before any real work (start-up)
            writers[f"start-up, {n} actor(s)"] = (lambda n=n: ray_writer(ids[:n], os.path.join(tmp, "s.parquet"), n))
        writers["in-process"]()  # warm-up (first-call costs); every Ray call builds a new actor pool anyway
        times: dict[str, list[float]] = {name: [] for name in writers}
        for _ in range(args.repeats):
            for name, write in writers.items():
                t0 = time.perf_counter()
                write()
                times[name].append(time.perf_counter() - t0)
        want = read_lm_topk_parquet(ref)
        for n in args.actors:
            got = read_lm_topk_parquet(os.path.join(tmp, f"ray{n}.parquet"))
            assert torch.equal(got.indices, want.indices) and torch.equal(got.logprobs, want.logprobs)
        sizes = {}
        for k in args.sizes:
            path = os.path.join(tmp, f"k{k}.parquet")
            sizes[k] = bytes_per_token(in_process(path, teacher, ids, k, 1.0, args.batch))

    print(header("LM top-k cache: Ray Data writer vs in-process writer"))
    print(f"{args.sequences} sequences x {args.length} tokens ({tokens} tokens), vocab {args.vocab}, teacher "
          f"{args.teacher} (layers x width), k {args.k}, batch {args.batch} sequences, 1 thread per writer / actor, "
          f"median of {args.repeats}; ray.init {init_s:.1f}s (not included)")
    base = statistics.median(times["in-process"])
    print(f"{'writer':<24}{'s':>8}{'tokens/s':>12}{'x in-process':>14}{'tokens/s after start-up':>25}")
    for name, values in times.items():
        if name.startswith("start-up"):
            continue
        s = statistics.median(values)
        startup = statistics.median(times.get(name.replace("Ray Data", "start-up"), [0.0]))
        net = f"{tokens / (s - startup):.0f}" if name != "in-process" and s > startup else ""
        print(f"{name:<24}{s:>8.2f}{tokens / s:>12.0f}{base / s:>14.2f}{net:>25}")
    for name, values in times.items():
        if name.startswith("start-up"):
            print(f"{name}: {statistics.median(values):.2f}s (a pass over one sequence per actor)")
    print("every Ray Data cache equals the in-process cache (ids and float16 log-probs)")
    print(f"{'k':>4}{'bytes/token':>14}{'raw 6k':>8}{'fp16 full vocab':>17}")
    for k, size in sizes.items():
        print(f"{k:>4}{size:>14.1f}{6 * k:>8}{2 * args.vocab:>17}")
    ray.shutdown()


if __name__ == "__main__":
    main()
