"""Adversarial distillation on digits: test accuracy (mean ± std over seeds) of the student from scratch, with
KD, with KD + the adversarial loss ("beside"), with CE + the adversarial loss alone ("instead") and with the
MEAL-V2 preset (2 teachers, averaged; KL at T=1 + adversarial, no hard labels). Each job trains its own
teachers (digits_cnn, same seed -> same teacher across the rows). Run:
``OMP_NUM_THREADS=1 python bench/adversarial_table.py [--epochs 10 --seeds 0 1 2]``.

Measured 2026-12-02 on the project's shared 2-core CPU box (torch 2.14.1, ray 2.60, in-process, 1 thread),
``--epochs 10 --seeds 0 1 2`` (student digits_mlp hidden 32, teacher digits_cnn 10 epochs, 40 % of the training
split):


| student | test top-1 mean ± std |
|---|---|
| teacher (digits_cnn) | 0.989 ± 0.006 (1.07x scratch) |
| scratch | 0.928 ± 0.010 (1.00x scratch) |
| KD | 0.944 ± 0.010 (1.02x scratch) |
| adversarial, beside KD | 0.946 ± 0.008 (1.02x scratch) |
| adversarial, instead of KD (CE + adv) | 0.928 ± 0.008 (1.00x scratch) |
| MEAL-V2 preset (2 teachers) | 0.929 ± 0.010 (1.00x scratch) |

(the "teacher" row is the offline job's; MEAL-V2's two teachers are digits_cnn and digits_cnn width 16.) On this
small task the adversarial term beside KD is within one std of KD alone; the fool loss instead of KD adds nothing
over scratch, and MEAL-V2 (no hard labels, T=1) is at scratch level: a single 10-epoch digits run is no evidence
either way about ImageNet-scale claims.
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

import kdray  # noqa: E402


def job(root: str, name: str, seed: int, epochs: int, **over) -> dict:
    teacher = {"model": "digits_cnn", "train": {"epochs": epochs, "lr": 0.05, "batch_size": 32}}
    cfg = {
        "name": name, "output_dir": root, "scheme": "adversarial",
        "data": {"name": "digits", "options": {"train_fraction": 0.4}},
        "teacher": teacher,
        "student": {"model": "digits_mlp", "args": {"hidden": 32}},
        "methods": [{"name": "kd", "alpha": 0.9, "temperature": 4.0}],
        "train": {"epochs": epochs, "lr": 0.05, "batch_size": 32},
        "seeds": [seed], "baseline": False, "ray": {"num_workers": 0}, "mlflow": {"enabled": False},
    }
    cfg.update(over)
    if cfg.get("teacher") is None:
        cfg.pop("teacher")
    return cfg


def rows(root: str, seed: int, epochs: int) -> dict[str, float]:
    """One seed: each row's test accuracy."""
    t = {"model": "digits_cnn", "train": {"epochs": epochs, "lr": 0.05, "batch_size": 32}}
    out = {}
    offline = kdray.distill(job(root, f"kd-{seed}", seed, epochs, scheme="offline", baseline=True),
                            quiet=True, log=lambda *a: None)
    out["teacher (digits_cnn)"] = offline.stages[0]["test_top1"]
    out["scratch"] = offline.accuracies("scratch")[0]
    out["KD"] = offline.accuracies("distill")[0]
    beside = kdray.distill(job(root, f"beside-{seed}", seed, epochs), quiet=True, log=lambda *a: None)
    out["adversarial, beside KD"] = beside.stages[-1]["test_top1"]
    instead = kdray.distill(job(root, f"instead-{seed}", seed, epochs, methods=[],
                                adversarial={"mode": "instead"}), quiet=True, log=lambda *a: None)
    out["adversarial, instead of KD (CE + adv)"] = instead.stages[-1]["test_top1"]
    meal = job(root, f"meal-{seed}", seed, epochs, teacher=None, teachers=[t, {**t, "args": {"width": 16}}],
               adversarial={"preset": "meal_v2"})
    meal.pop("methods")
    out["MEAL-V2 preset (2 teachers)"] = kdray.distill(meal, quiet=True, log=lambda *a: None).stages[-1]["test_top1"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    per_seed = []
    with tempfile.TemporaryDirectory() as root:
        for seed in args.seeds:
            per_seed.append(rows(root, seed, args.epochs))
    print(header("Adversarial KD on digits (test top-1)"))
    print(f"epochs {args.epochs}, seeds {args.seeds}, {time.perf_counter() - start:.0f} s\n")
    print("| student | test top-1 mean ± std |\n|---|---|")
    base = statistics.mean(r["scratch"] for r in per_seed)
    for name in per_seed[0]:
        values = [r[name] for r in per_seed]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {name} | {statistics.mean(values):.3f} ± {std:.3f} ({statistics.mean(values) / base:.2f}x scratch) |")


if __name__ == "__main__":
    main()
