"""What Ray costs a small job: the packaged main job (``kdray run digits``) in-process, on one Ray Train
worker and on two, each a fresh ``kdray`` process (so Ray's start-up is included, as a user pays it).

Prints wall time per placement, the job's own "stages done in" training time, and both as ratios against
in-process. ``one worker (2 s poll)`` is the same run with Ray Train's default controller poll
(``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=2``): the state before kdray set 0.1 s (orchestrator/runtime.py), so
the before/after of that change is measured in the same run. Runs interleave (round-robin) so that load
that comes and goes on a shared machine hits every placement alike.

Run: ``python bench/ray_overhead.py [--repeats 2] [--overrides train.epochs=3 ...]``.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import header  # noqa: E402

PLACEMENTS = {
    "in-process": (["ray.num_workers=0"], {}),
    "one worker": (["ray.num_workers=1"], {}),
    "one worker (2 s poll)": (["ray.num_workers=1"], {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2"}),
    "two workers": (["ray.num_workers=2"], {}),
}
DONE = re.compile(r"stages done in ([0-9.]+)s")


def run_once(placement: str, folder: str, overrides: list[str], index: int) -> tuple[float, float]:
    """(wall seconds, training seconds) of one ``kdray run digits`` in a fresh process."""
    extra, env_over = PLACEMENTS[placement]
    name = f"{re.sub(r'[^a-z0-9]+', '-', placement)}-{index}"
    env = {**os.environ, "RAY_ADDRESS": "", **env_over}
    env.pop("RAY_ADDRESS")
    cmd = ["kdray", "run", "digits", f"name={name}", f"output_dir={folder}/runs",
           f"mlflow.tracking_uri=sqlite:///{folder}/mlflow.db", *extra, *overrides]
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"{placement}: exit {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    found = DONE.findall(out.stdout + out.stderr)
    return wall, float(found[-1]) if found else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--overrides", nargs="*", default=[], help="key.path=value for every run")
    parser.add_argument("--only", nargs="*", default=list(PLACEMENTS), choices=list(PLACEMENTS))
    args = parser.parse_args()
    print(header("kdray run digits: in-process vs Ray Train workers (fresh process each, Ray start-up included)"))
    times: dict[str, list[tuple[float, float]]] = {p: [] for p in args.only}
    with tempfile.TemporaryDirectory() as folder:
        for i in range(args.repeats):
            for placement in args.only:
                times[placement].append(run_once(placement, folder, args.overrides, i))
                print(f"  {placement:<22} run {i}: wall {times[placement][-1][0]:.1f}s, "
                      f"training {times[placement][-1][1]:.1f}s", flush=True)
    base_wall = statistics.median(w for w, _ in times[args.only[0]])
    base_train = statistics.median(t for _, t in times[args.only[0]])
    print(f"\n| placement | wall s | wall / {args.only[0]} | training s | training / {args.only[0]} |")
    print("|---|---|---|---|---|")
    for placement, rows in times.items():
        wall, train = statistics.median(w for w, _ in rows), statistics.median(t for _, t in rows)
        print(f"| {placement} | {wall:.1f} | {wall / base_wall:.2f}x | {train:.1f} | {train / base_train:.2f}x |")
    print(f"\nmedians of {args.repeats} interleaved runs; goal: one worker within 1.5x of in-process wall time")


if __name__ == "__main__":
    main()
