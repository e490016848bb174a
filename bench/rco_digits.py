"""RCO vs offline KD from the final teacher on digits: 3 seeds, the same teacher, the same student epochs.

The RCO student is taught by the teacher's weights after each of ``--anchors`` epochs (``--per-anchor`` epochs
each), then by the final teacher (``--final`` epochs). The offline KD student is taught by the final teacher
alone for as many epochs in total (anchors x per-anchor + final), so both take the same optimizer steps. Both
jobs train the teacher identically (stage seed 0; its accuracy is printed for each to show it). Prints test
top-1 per seed, mean +- std and the mean paired difference. Run: ``python bench/rco_digits.py``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import header  # noqa: E402

import kdray  # noqa: E402


def job(out: str, name: str, args, **over) -> dict:
    cfg = {
        "name": name, "output_dir": out,
        "data": {"name": "digits", "options": {"train_fraction": args.fraction}},
        "teacher": {"model": "digits_cnn", "train": {"epochs": args.teacher_epochs, "lr": 0.05, "batch_size": 32}},
        "student": {"model": "digits_mlp", "args": {"hidden": 16}},
        "methods": [{"name": "kd", "alpha": 0.9, "temperature": 4.0}],
        "train": {"epochs": args.final, "lr": 0.05, "batch_size": 32},
        "seeds": args.seeds, "baseline": False, "ray": {"num_workers": 0}, "mlflow": {"enabled": False},
    }
    cfg.update(over)
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher-epochs", type=int, default=15)
    parser.add_argument("--anchors", type=int, nargs="+", default=[3, 6, 10])
    parser.add_argument("--per-anchor", type=int, default=4)
    parser.add_argument("--final", type=int, default=8)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    total = len(args.anchors) * args.per_anchor + args.final
    print(header("RCO vs offline KD, digits kd (digits_cnn -> digits_mlp hidden 16)"))
    print(f"teacher {args.teacher_epochs} epochs; RCO anchors {args.anchors} x {args.per_anchor} epochs + final "
          f"{args.final}; offline KD {total} epochs; train_fraction {args.fraction}; seeds {args.seeds}")
    with tempfile.TemporaryDirectory() as out:
        rco = kdray.distill(job(out, "rco", args, scheme="rco",
                                rco={"anchors": args.anchors, "epochs_per_anchor": args.per_anchor}),
                            quiet=True, log=lambda m: None)
        offline = kdray.distill(job(out, "offline", args, train={**job(out, "", args)["train"], "epochs": total}),
                                quiet=True, log=lambda m: None)
    rows = {"offline KD (final teacher)": (offline, "distill"), "RCO": (rco, "rco")}
    acc = {}
    for label, (result, kind) in rows.items():
        acc[label] = result.accuracies(kind)
        print(f"{label:28s} teacher {result.accuracies('teacher')[0]:.4f}  students "
              f"{[round(a, 4) for a in acc[label]]}  mean {statistics.mean(acc[label]):.4f} +- "
              f"{statistics.stdev(acc[label]):.4f}")
    anchors = rco.accuracies("rco_anchor")
    print(f"RCO anchor stages' students (per seed, in anchor order): {[round(a, 4) for a in anchors]}")
    diffs = [r - o for r, o in zip(acc["RCO"], acc["offline KD (final teacher)"])]
    print(f"RCO - offline per seed {[round(d, 4) for d in diffs]}; mean {statistics.mean(diffs):+.4f}")


if __name__ == "__main__":
    main()
