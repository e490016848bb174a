"""ASHA + TPE against a full grid over the same small digits space.

Both searches distil the same teacher into a digits MLP with the same seeds and split; the grid trains
every configuration for the full schedule, ASHA+TPE samples the same discrete values and stops poor
trials early. Reported: the best validation accuracy each reaches, the trial-epochs each spends, their
ratio, and the trial-epochs ASHA+TPE had spent when it first matched the grid's best (goal: the grid's
best at <= 25% of the grid's trial-epochs).

    python bench/search.py                 # default: 27-point grid, 20 epochs, 16 trials x 5 TPE seeds
    python bench/search.py --repeats 1 --samples 16 --epochs 20 --mlflow
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")

SPACE = {
    "student.args.hidden": {"choice": [8, 16, 32]},
    "methods.0.temperature": {"choice": [1.0, 4.0, 8.0]},
    "train.lr": {"choice": [0.02, 0.06, 0.2]},
}


def base_job(out: str, epochs: int, mlflow_uri: str | None, teacher: str | None) -> dict:
    job = {
        "name": "bench", "output_dir": out,
        "data": {"name": "digits", "options": {"train_fraction": 0.2}},
        "teacher": {"model": "digits_cnn", "args": {"width": 16}},
        "student": {"model": "digits_mlp", "args": {"hidden": 16}},
        "methods": [{"name": "kd", "alpha": 0.9, "temperature": 4.0}],
        "train": {"epochs": epochs, "lr": 0.05, "batch_size": 32},
        "seeds": [0], "baseline": False, "ray": {"num_workers": 0},
        "mlflow": {"enabled": mlflow_uri is not None, "tracking_uri": mlflow_uri, "experiment": "kdray-bench"},
    }
    if teacher:
        job["teacher"]["checkpoint"] = teacher
    else:
        job["teacher"]["train"] = {"epochs": 30, "lr": 0.05, "batch_size": 32}
    return job


def first_hit_epochs(trials, target: float) -> int | None:
    """Trial-epochs spent (trials in the order Tune created them) when a full-budget trial first reached
    ``target``; None if none did."""
    spent = 0
    for _, row in trials.sort_values("order").iterrows():
        spent += int(row["trial_epochs"])
        if row["full_budget"] and row["val_top1"] >= target - 1e-12:
            return spent
    return None


def with_order(result):
    import json as _json

    df = result.trials.copy()
    starts = []
    for _, row in df.iterrows():
        path = os.path.join(result.path, "tune", row["name"], "result.json")
        with open(path) as fh:
            first = _json.loads(fh.readline())
        starts.append(first["timestamp"] - first["time_total_s"])
    df["order"] = starts
    return df


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--samples", type=int, default=16, help="ASHA+TPE trials per repeat")
    parser.add_argument("--repeats", type=int, default=5, help="ASHA+TPE runs (sampler seeds 0..n-1)")
    parser.add_argument("--grace", type=int, default=None, help="ASHA grace period (default: auto)")
    parser.add_argument("--reduction-factor", type=float, default=3.0)
    parser.add_argument("--concurrent", type=int, default=0, help="trials at a time (0: from Ray's CPUs)")
    parser.add_argument("--mlflow", action="store_true", help="track both sweeps in MLflow (slower)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import mlflow
    import optuna
    import ray
    import torch

    import kdray

    out = args.out or tempfile.mkdtemp(prefix="kdray-bench-search-")
    uri = f"sqlite:///{out}/mlflow.db" if args.mlflow else None
    print("# kdray search benchmark: ASHA+TPE vs full grid")
    print(f"machine: {platform.node()} | {platform.platform()} | {platform.processor() or platform.machine()} | "
          f"{os.cpu_count()} CPUs | load avg {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"versions: python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}, "
          f"optuna {optuna.__version__}, mlflow {mlflow.__version__}, kdray {kdray.__version__}")
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=True, log_to_driver=False)
    concurrent = args.concurrent or "auto"
    n_grid = 1
    for spec in SPACE.values():
        n_grid *= len(spec["choice"])
    print(f"space: {json.dumps(SPACE)} -> {n_grid} configurations, {args.epochs} epochs each, seed 0, "
          f"digits (20% train)")
    quiet = lambda m: None  # noqa: E731

    start = time.perf_counter()
    grid = kdray.sweep(SPACE, base_job(out, args.epochs, uri, None), sampler="grid", num_samples=None, asha=False,
                       name="grid", output_dir=out, max_concurrent=concurrent, verbose=0, register_model=False,
                       log=quiet)
    grid_wall = time.perf_counter() - start
    grid_epochs = int(grid.trials["trial_epochs"].sum())
    grid_best = float(grid.trials["val_top1"].max())
    print(f"\ngrid: {len(grid.trials)} trials, best val top-1 {grid_best:.4f} "
          f"({int((grid.trials['val_top1'] >= grid_best - 1e-12).sum())} config(s) reach it), "
          f"{grid_epochs} trial-epochs, {grid_wall:.0f} s")
    teacher = os.path.join(grid.path, "teacher.pt")  # the same teacher for every search

    rows = []
    for seed in range(args.repeats):
        start = time.perf_counter()
        res = kdray.sweep(SPACE, base_job(out, args.epochs, uri, teacher), sampler="tpe", num_samples=args.samples,
                          asha={"grace_period": args.grace or "auto", "reduction_factor": args.reduction_factor},
                          seed=seed, name=f"asha-tpe-{seed}", output_dir=out, max_concurrent=concurrent, verbose=0,
                          register_model=False, log=quiet)
        wall = time.perf_counter() - start
        df = with_order(res)
        epochs = int(df["trial_epochs"].sum())
        full = df[df["full_budget"]]
        best = float(full["val_top1"].max()) if len(full) else float("nan")
        hit = first_hit_epochs(df, grid_best)
        rows.append({"seed": seed, "best": best, "epochs": epochs, "ratio": epochs / grid_epochs, "hit": hit,
                     "stopped": int((df["status"] == "early_stopped").sum()), "wall": wall,
                     "repeats": int((df["status"] == "duplicate").sum()),
                     "distinct": df[list(SPACE)].astype(str).drop_duplicates().shape[0]})
        r = rows[-1]
        print(f"asha+tpe seed {seed}: {len(df)} trials ({r['distinct']} distinct configs, {r['stopped']} stopped "
              f"early, {r['repeats']} repeats of a finished config: not retrained), best val top-1 {best:.4f}, {epochs} trial-epochs = {r['ratio']:.1%} of the grid's; "
              + (f"reached the grid's best after {hit} trial-epochs = {hit / grid_epochs:.1%}" if hit else
                 "did not reach the grid's best") + f"; {wall:.0f} s")

    print("\n| search | best val top-1 | trial-epochs | ratio to grid | grid's best reached at |")
    print("|---|---|---|---|---|")
    print(f"| grid ({n_grid} configs) | {grid_best:.4f} | {grid_epochs} | 100% | |")
    for r in rows:
        at = f"{r['hit']} ({r['hit'] / grid_epochs:.1%})" if r["hit"] else "not reached"
        print(f"| ASHA+TPE seed {r['seed']} ({args.samples} trials) | {r['best']:.4f} | {r['epochs']} | "
              f"{r['ratio']:.1%} | {at} |")
    reached = [r for r in rows if r["hit"] and r["hit"] <= 0.25 * grid_epochs]
    mean_ratio = statistics.mean(r["ratio"] for r in rows)
    print(f"\nmean ASHA+TPE cost: {mean_ratio:.1%} of the grid's trial-epochs; goal (grid's best at <= 25% of its "
          f"trial-epochs) met in {len(reached)}/{len(rows)} run(s)")
    print(f"outputs: {out}")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
