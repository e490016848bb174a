"""Block-wise NAS-guided distillation (DNA) against kdray's whole-student search at one parameter budget.

Both searches distil the same digits_cnn teacher (same data, split, seed, epochs) with Hinton KD; each trains
its own teacher in its base job (counted in its wall time, not in its trial-epochs).

- block-wise: ``kdray.block_search`` over 16 candidates per block (width {2,4,8,16} x depth {1,2} x kernel
  {3,5}) on the teacher's two stages, the best assembly within the budget distilled end to end (starting from
  its searched blocks and the teacher's head), ``--compare`` more assemblies spread over the score ranking
  distilled too, for the Spearman rho of summed block loss vs val top-1; each of them is also distilled from
  random weights (``inherit: false``, DNA's retraining from scratch), with its own rho.
- whole-student: ``kdray.sweep`` (TPE + ASHA) over students that all fit the budget: digits_cnn width 2..W
  and digits_mlp hidden 4..H, and the learning rate.

Block trial-epochs train one block on cached teacher features: far cheaper than a whole-student epoch; the
table gives both counts and the wall times.

    python bench/blockwise_nas.py                  # budget 3000, 12 whole-student trials, 5 compared assemblies
    python bench/blockwise_nas.py --budget 2000 --samples 8 --compare 3

``--out DIR`` of an earlier run resumes both searches (nothing trained twice); the block search keeps the wall
times of its first run, the sweep's wall time is then that of the resumed call.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")


def base_job(out: str, epochs: int, teacher_epochs: int, fraction: float, uri: str | None) -> dict:
    return {
        "name": "bench", "output_dir": out,
        "data": {"name": "digits", "options": {"train_fraction": fraction}},
        "teacher": {"model": "digits_cnn", "args": {"width": 16},
                    "train": {"epochs": teacher_epochs, "lr": 0.05, "batch_size": 32}},
        "student": {"model": "digits_cnn", "args": {"width": 2}},
        "methods": [{"name": "kd", "alpha": 0.9, "temperature": 4.0}],
        "train": {"epochs": epochs, "lr": 0.05, "batch_size": 32},
        "seeds": [0], "baseline": False, "ray": {"num_workers": 0},
        "mlflow": {"tracking_uri": uri, "enabled": uri is not None, "experiment": "bench-blockwise-nas"},
    }


def cnn_params(width: int) -> int:
    from kdray.models import create_model

    return sum(p.numel() for p in create_model("digits_cnn", 10, width=width).parameters())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=int, default=3000)
    p.add_argument("--epochs", type=int, default=20, help="end-to-end distillation epochs (both searches)")
    p.add_argument("--teacher-epochs", type=int, default=30)
    p.add_argument("--fraction", type=float, default=0.5, help="data.options.train_fraction")
    p.add_argument("--samples", type=int, default=12, help="whole-student sweep trials")
    p.add_argument("--compare", type=int, default=5, help="further assemblies distilled for the Spearman rho")
    p.add_argument("--block-epochs", type=int, default=10)
    p.add_argument("--mlflow", action="store_true", help="track both in an MLflow store under the output dir")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import kdray
    from kdray.orchestrator.api import distill
    from kdray.orchestrator.plan import get_scheme

    out = args.out or tempfile.mkdtemp(prefix="kdray-bench-nas-")
    uri = f"sqlite:///{os.path.join(out, 'mlflow.db')}" if args.mlflow else None
    base = base_job(os.path.join(out, "runs"), args.epochs, args.teacher_epochs, args.fraction, uri)

    # --- block-wise (DNA) ---
    nas = kdray.block_search(base, ["stage1", "stage2"], widths=[2, 4, 8, 16], depths=[1, 2], kernels=[3, 5],
                             epochs=args.block_epochs, budget=args.budget, compare=args.compare, name="nas",
                             output_dir=out, resume=os.path.exists(os.path.join(out, "nas", "nas.json")), log=lambda m: print(f"  [nas] {m}", flush=True))
    # every distilled assembly again from random weights (DNA retrains the found architecture from scratch)
    kind = get_scheme("offline").searched_kind
    scratch_all = []
    for k, a in enumerate(nas.candidates):
        raw = {**base, "name": "assembled-scratch" if k == 0 else f"assembly-{k}-scratch", "output_dir": nas.path,
               "teacher": {"model": "digits_cnn", "args": {"width": 16},
                           "checkpoint": os.path.join(nas.path, "teacher.pt")},
               "student": {"model": "blockwise_student", "args": {"blocks": a["blocks"]}}}
        t1 = time.time()
        stages = [s for s in distill(raw, resume=True, log=lambda m: None, quiet=True).stages if s["kind"] == kind]
        scratch_all.append({"val_top1": stages[0]["val_top1"], "test_top1": stages[0]["test_top1"],
                            "wall": time.time() - t1})
    scratch = scratch_all[0]

    # --- whole-student search at the same budget ---
    w_max = max(w for w in range(2, 17) if cnn_params(w) <= args.budget)
    h_max = (args.budget - 10) // 75  # digits_mlp, depth 1: 75 h + 10 parameters
    space = {"student.model": {"choice": {"digits_cnn": {"student.args.width": {"int": [2, w_max]}},
                                          "digits_mlp": {"student.args.hidden": {"int": [4, h_max], "log": True}}}},
             "train.lr": {"float": [0.02, 0.2], "log": True}}
    t0 = time.time()
    sw = kdray.sweep(space, base, num_samples=args.samples, sampler="tpe", seeds=[0], name="whole",
                     output_dir=out, resume=os.path.exists(os.path.join(out, "whole", "sweep.json")), verbose=0, register_model=False,
                     log=lambda m: print(f"  [sweep] {m}", flush=True))
    sw_wall = time.time() - t0
    best = sw.best
    assert best["params"] <= args.budget, best

    c = nas.cost
    search_s = c["base_s"] + c["trials_s"] + c["distill_s"]  # without the assemblies distilled only for rho
    rows = [("block-wise (DNA): chosen assembly, inherited blocks", nas.assembled["val_top1"],
             nas.assembled["test_top1"], nas.assembled["params"],
             f"{c['block_trial_epochs']} block + {c['distill_epochs']} e2e", search_s),
            ("block-wise (DNA): chosen architecture, from scratch", scratch["val_top1"], scratch["test_top1"],
             nas.assembled["params"], f"+{args.epochs} e2e", scratch["wall"]),
            (f"whole-student search best ({best['student.model']})", best["val_top1"], best["test_top1"],
             best["params"], f"{int(sw.trials['trial_epochs'].sum())} e2e ({len(sw.trials)} trials)", sw_wall)]
    print(f"\nBudget {args.budget:,} params; teacher digits_cnn(16) {cnn_params(16):,} params; digits, "
          f"train_fraction {args.fraction}, {args.epochs} distillation epochs, seed 0")
    print("| search | val top-1 | test top-1 | params | trial-epochs | wall s |")
    print("|---|---|---|---|---|---|")
    for name, val, test, params, epochs, wall in rows:
        print(f"| {name} | {val:.4f} | {test:.4f} | {int(params):,} | {epochs} | {wall:.0f} |")
    print(f"\nwall s: teacher + base job {c['base_s']:.0f} (both searches train one), block trials {c['trials_s']:.0f}, "
          f"chosen assembly's distillation {c['distill_s']:.0f}, {len(nas.candidates) - 1} more for rho "
          f"{c['compare_s']:.0f} ({c['compare_epochs']} e2e epochs); whole-student sweep incl. its base job {sw_wall:.0f}")
    print(f"\nchosen blocks: {' / '.join(nas.chosen['choice'])} (summed block loss {nas.chosen['block_loss']:.3f})")
    print("assemblies distilled (summed block loss -> val top-1):")
    for a, z in zip(nas.candidates, scratch_all):
        print(f"  {' / '.join(a['choice']):24s} {int(a['params']):6,} params  loss {a['block_loss']:.3f}  "
              f"val {a['val_top1']:.4f}  test {a['test_top1']:.4f}  (from scratch: val {z['val_top1']:.4f}  "
              f"test {z['test_top1']:.4f})")
    rho = nas.spearman
    print(f"Spearman rho (summed block loss vs val top-1, {len(nas.candidates)} assemblies): "
          f"{'n/a' if rho is None else f'{rho:.3f}'}  (negative: lower block loss, higher accuracy)")
    from kdray.search.blockwise import spearman

    rho0 = spearman([a["block_loss"] for a in nas.candidates], [z["val_top1"] for z in scratch_all])
    print(f"Spearman rho, the same assemblies distilled from scratch: {'n/a' if rho0 is None else f'{rho0:.3f}'}")
    print(f"whole-student best: {sw.best_params}")
    print(f"output: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
