"""DOT vs SGD on digits KD: the same teacher and student, 3 seeds, test top-1 of each optimiser.

Three students per seed, distilled with ``kd`` from the same teacher (trained once per job, seed 0 stage):
``sgd`` (kdray's default: Nesterov momentum 0.9), ``dot`` (momentum 0.9, delta 0.075: KD 0.975, CE 0.825) and
``dot`` with delta 0 (heavy-ball momentum 0.9, no split: separates DOT's effect from Nesterov's). Prints the
mean +- std per optimiser and the mean paired difference DOT - SGD. Run: ``python bench/dot_digits.py``
(about a minute per optimiser on one CPU thread; ``--epochs``, ``--fraction`` change the budget).
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


def job(out: str, name: str, optimizer: str, delta: float, args) -> dict:
    return {
        "name": name, "output_dir": out,
        "data": {"name": "digits", "options": {"train_fraction": args.fraction}},
        "teacher": {"model": "digits_cnn", "train": {"epochs": args.epochs, "lr": 0.05, "batch_size": 32}},
        "student": {"model": "digits_mlp", "args": {"hidden": 16}},
        "methods": [{"name": "kd", "alpha": 0.9, "temperature": 4.0}],
        "train": {"epochs": args.epochs, "lr": 0.05, "batch_size": 32, "optimizer": optimizer,
                  "dot_delta": delta},
        "seeds": args.seeds, "baseline": False, "ray": {"num_workers": 0}, "mlflow": {"enabled": False},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(header("DOT vs SGD, digits kd (digits_cnn -> digits_mlp hidden 16)"))
    print(f"epochs {args.epochs} (teacher and student), train_fraction {args.fraction}, seeds {args.seeds}, "
          f"lr 0.05 cosine, batch 32, kd alpha 0.9 T 4")
    runs = {"sgd (nesterov 0.9)": ("sgd", 0.075), "dot (0.9 +- 0.075)": ("dot", 0.075),
            "dot delta 0 (heavy ball 0.9)": ("dot", 0.0)}
    acc = {}
    with tempfile.TemporaryDirectory() as out:
        for i, (label, (opt, delta)) in enumerate(runs.items()):
            result = kdray.distill(job(out, f"j{i}", opt, delta, args), quiet=True, log=lambda m: None)
            acc[label] = result.accuracies("distill")
            teacher = result.accuracies("teacher")
            print(f"{label:30s} teacher {teacher[0]:.4f}  students {[round(a, 4) for a in acc[label]]}  "
                  f"mean {statistics.mean(acc[label]):.4f} +- {statistics.stdev(acc[label]):.4f}", flush=True)
    sgd, dot = acc["sgd (nesterov 0.9)"], acc["dot (0.9 +- 0.075)"]
    diffs = [d - s for d, s in zip(dot, sgd)]
    print(f"DOT - SGD per seed {[round(d, 4) for d in diffs]}; mean {statistics.mean(diffs):+.4f}; "
          f"ratio of means {statistics.mean(dot) / statistics.mean(sgd):.3f}")


if __name__ == "__main__":
    main()
