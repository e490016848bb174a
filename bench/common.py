"""Shared benchmark helpers: machine/version header and a robust step timer."""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch


def step_parser() -> argparse.ArgumentParser:
    """The options every teacher -> student step benchmark takes (device, batch, repeats, the pair)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--teacher", default="resnet56")
    parser.add_argument("--student", default="resnet20")
    return parser


def header(title: str) -> str:
    import ray

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU x{os.cpu_count()}"
    return (f"# {title}\nmachine: {platform.machine()} {device}; python {platform.python_version()}; "
            f"torch {torch.__version__}; ray {ray.__version__}; threads {torch.get_num_threads()}")


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: dict, device, warmup: int = 2, repeats: int = 10) -> dict[str, float]:
    """Median seconds per call of each function, measured round-robin so that load that comes and goes
    on a shared machine hits every contender alike (ratios stay meaningful)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def time_steps(fn, device, warmup: int = 3, repeats: int = 10) -> float:
    """Median seconds per call of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
