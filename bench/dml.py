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


def _worker(rank, world, init, model, size, steps, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    peer = PeerReplica(create_model(model, 100), rank, gather_peer_logits)
    t = _steps(peer, _batch(size), steps)
    if rank == 0:
        with open(out, "w") as fh:
            fh.write(str(t))
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    sequential = _steps(PeerCohort([create_model(args.model, 100), create_model(args.model, 100)]),
                        _batch(args.batch), args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "t")
        mp.spawn(_worker, args=(2, f"file://{tmp}/pg", args.model, args.batch, args.steps, out), nprocs=2)
        parallel = float(open(out).read())
    print(header(f"DML, 2 x {args.model} peers, batch {args.batch}"))
    print(f"| placement | ms / step |\n|---|---|\n| sequential peers, one process (2 threads) | "
          f"{sequential * 1e3:.0f} |\n| peer-parallel, 2 processes (1 thread each) + all_gather | {parallel * 1e3:.0f} |")
    print(f"\nratio peer-parallel / sequential = {parallel / sequential:.3f}")


if __name__ == "__main__":
    main()
