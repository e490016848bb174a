"""Peer-parallel DML on 2 worker processes (gloo, one peer each, logits all-gathered every step) vs
the same 2 peers stepped sequentially in one process. Prints ms/step of each and their ratio.

On N accelerators peer-parallel should approach 1/K of the sequential time; on a 2-core CPU both
placements share the same two cores (1 thread per process vs 2 threads in one), so the ratio shows
the cost of the exchange rather than a speed-up. Run: ``python bench/dml.py [--model resnet20]``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from common import header  # noqa: E402

from kdray.algorithms.base import Batch  # noqa: E402
from kdray.algorithms.schemes.online import PeerCohort, PeerReplica  # noqa: E402
from kdray.models import create_model  # noqa: E402
from kdray.orchestrator.placement import gather_peer_logits  # noqa: E402


def _batch(size):
    g = torch.Generator().manual_seed(0)
    return Batch(torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 100, (size,), generator=g),
                 torch.arange(size))


def _steps(module, batch, steps, warmup=2):
    opt = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        _, losses = module(batch)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def _terms(method):
    from kdray.algorithms.base import create_method

    return (lambda: [create_method(method)]) if method else None


def _worker(rank, world, init, model, size, steps, out, method):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    batch = _batch(size)
    peer = PeerReplica([create_model(model, 100), create_model(model, 100)], rank, gather_peer_logits,
                       make_terms=_terms(method))
    peer.build(batch.inputs)  # the exchange packs logits + the features the other peer's terms read
    t = _steps(peer, batch, steps)
    if rank == 0:
        with open(out, "w") as fh:
            fh.write(str(t))
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--method", default=None, help="a feature/relation term between the peers, e.g. at")
    args = parser.parse_args()
    torch.set_num_threads(2)
    cohort = PeerCohort([create_model(args.model, 100), create_model(args.model, 100)],
                        make_terms=_terms(args.method))
    cohort.build(_batch(args.batch).inputs)
    sequential, parallel = [], []
    for _ in range(2):  # interleaved, best of two: other load on the box hits both placements alike
        sequential.append(_steps(cohort, _batch(args.batch), args.steps))
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "t")
            mp.spawn(_worker, args=(2, f"file://{tmp}/pg", args.model, args.batch, args.steps, out, args.method),
                     nprocs=2)
            parallel.append(float(open(out).read()))
    sequential, parallel = min(sequential), min(parallel)
    print(header(f"DML{' + ' + args.method if args.method else ''}, 2 x {args.model} peers, batch {args.batch}"))
    print(f"| placement | ms / step |\n|---|---|\n| sequential peers, one process (2 threads) | "
          f"{sequential * 1e3:.0f} |\n| peer-parallel, 2 processes (1 thread each) + all_gather | {parallel * 1e3:.0f} |")
    print(f"\nratio peer-parallel / sequential = {parallel / sequential:.3f}")


if __name__ == "__main__":
    main()
