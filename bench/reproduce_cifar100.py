"""Reproduce the CRD paper's CIFAR-100 KD rows with kdray: resnet56 -> resnet20 and resnet32x4 -> resnet8x4.

Protocol (Tian, Krishnan & Isola, ICLR 2020, and its RepDistiller code): 240 epochs, SGD lr 0.05, momentum
0.9, weight decay 5e-4, batch 64, lr x0.1 at epochs 150 / 180 / 210, standard crop + flip augmentation;
KD at T = 4 with ``0.1 * CE + 0.9 * KD`` (kdray's ``kd`` with ``alpha = 0.9``). The configs are
``examples/cifar100_crd_<teacher>_<student>.yaml``; this script loads them, points the teacher at a
RepDistiller checkpoint when one is given (``--teacher-checkpoint``; RepDistiller saves
``{"model": state_dict, ...}``, which kdray unwraps, and kdray's CIFAR ResNets use its module names) or
trains it with the same protocol otherwise, runs ``kdray.distill`` and prints kdray's test top-1 next
to the published one.

Published (CRD paper, Table 1; RepDistiller reports the best test accuracy over the epochs, averaged over
runs; kdray reports the last epoch's):

    pair                     teacher  student (scratch)  KD     CRD
    resnet56 -> resnet20     72.34    69.06              70.66  71.16
    resnet32x4 -> resnet8x4  79.42    72.50              73.33  75.51

Meant for a GPU (1 seed takes a few GPU-hours per pair with the scratch baseline). ``--dry-run``
validates the configs with ``kdray.load_config`` and prints the plan without touching data or models.

    python bench/reproduce_cifar100.py --pair resnet56_resnet20 --teacher-checkpoint resnet56.pth
    python bench/reproduce_cifar100.py --teacher-checkpoint resnet56=r56.pth --teacher-checkpoint resnet32x4=r32x4.pth
    python bench/reproduce_cifar100.py --workers 4 --seeds 3        # Ray Train, 4 data-parallel workers
    python bench/reproduce_cifar100.py --dry-run
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIRS = {
    "resnet56_resnet20": ("resnet56", "resnet20"),
    "resnet32x4_resnet8x4": ("resnet32x4", "resnet8x4"),
}
# CRD paper, Table 1 (top-1 %, CIFAR-100 test set).
PUBLISHED = {
    "resnet56_resnet20": {"teacher": 72.34, "scratch": 69.06, "kd": 70.66, "crd": 71.16},
    "resnet32x4_resnet8x4": {"teacher": 79.42, "scratch": 72.50, "kd": 73.33, "crd": 75.51},
}
# The method rows this script can set up exactly as RepDistiller weights them.
METHODS = {
    "kd": [{"name": "kd", "alpha": 0.9, "temperature": 4.0}],  # -r 0.1 -a 0.9 -b 0, T 4
    "crd": [{"name": "crd", "weight": 0.8}],  # -r 1 -a 0 -b 0.8 (CE 1 is the distiller's ce_weight)
}


def example_path(pair: str) -> str:
    return os.path.join(ROOT, "examples", f"cifar100_crd_{pair}.yaml")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", choices=[*PAIRS, "all"], default="all")
    p.add_argument("--teacher-checkpoint", action="append", default=[], metavar="[TEACHER=]PATH",
                   help="a RepDistiller teacher checkpoint; 'resnet56=PATH' form when several pairs run")
    p.add_argument("--method", choices=sorted(METHODS), default="kd")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (0: in this process)")
    p.add_argument("--data-root", default=None, help="CIFAR-100 folder (default: the YAML's ./data)")
    p.add_argument("--no-download", action="store_true")
    p.add_argument("--no-baseline", action="store_true", help="skip the students trained from scratch")
    p.add_argument("--epochs", type=int, default=None, help="override the 240 epochs (smoke tests only; the "
                   "lr milestones are scaled along)")
    p.add_argument("--output-dir", default=None)
    p.add_argument("--mlflow", default=None, help="tracking URI (default: MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--dry-run", action="store_true", help="validate the configs and print the plan; train nothing")
    return p.parse_args(argv)


def teacher_checkpoints(args, pairs: list[str]) -> dict[str, str]:
    """``{teacher_model: path}`` from the ``--teacher-checkpoint`` arguments."""
    out: dict[str, str] = {}
    teachers = [PAIRS[p][0] for p in pairs]
    for item in args.teacher_checkpoint:
        model, sep, path = item.partition("=")
        if not sep:
            if len(teachers) != 1:
                raise SystemExit(f"--teacher-checkpoint {item!r}: several pairs run ({', '.join(pairs)}); "
                                 f"write TEACHER=PATH (teachers: {', '.join(teachers)})")
            model, path = teachers[0], item
        if model not in teachers:
            raise SystemExit(f"--teacher-checkpoint: no selected pair has teacher {model!r} (teachers: "
                             f"{', '.join(teachers)})")
        out[model] = os.path.abspath(os.path.expanduser(path))
    return out


def build_config(pair: str, args, checkpoints: dict[str, str]):
    """The example YAML with this run's choices applied, validated by ``kdray.load_config``."""
    from kdray.config import load_config, read_yaml

    raw = read_yaml(example_path(pair))
    teacher = PAIRS[pair][0]
    if teacher in checkpoints:
        raw["teacher"] = {"model": teacher, "checkpoint": checkpoints[teacher]}
    raw["methods"] = METHODS[args.method]
    if args.method != "kd":
        raw["name"] = f"{raw['name']}-{args.method}"
    raw["seeds"] = list(range(args.seeds))
    raw["baseline"] = not args.no_baseline
    raw["ray"] = {**raw.get("ray", {}), "num_workers": args.workers}
    # Absolute, so Ray Train workers (which run in other working directories) find the same folder.
    raw["data"]["root"] = os.path.abspath(os.path.expanduser(args.data_root or raw["data"]["root"]))
    if args.no_download:
        raw["data"]["download"] = False
    if args.output_dir:
        raw["output_dir"] = args.output_dir
    if args.mlflow:
        raw["mlflow"] = {**raw.get("mlflow", {}), "tracking_uri": args.mlflow}
    if args.epochs is not None:
        for section in [raw["train"], raw["teacher"].get("train")]:
            if section:
                scale = args.epochs / section["epochs"]
                section["milestones"] = sorted({max(1, round(m * scale)) for m in section["milestones"]})
                section["epochs"] = args.epochs
    return load_config(raw)


def plan_text(pair: str, cfg) -> str:
    from kdray.orchestrator.plan import plan_stages

    t = cfg.train
    teacher = (f"{cfg.teacher.model} from checkpoint {cfg.teacher.checkpoint}" if cfg.teacher.checkpoint else
               f"{cfg.teacher.model} trained first ({cfg.teacher.train.epochs} epochs, same protocol)")
    methods = " + ".join(f"{m.name}({', '.join(f'{k}={v}' for k, v in m.params().items())})" for m in cfg.methods)
    lines = [
        f"{pair}: config {cfg.name!r} (from {os.path.relpath(example_path(pair), os.getcwd())})",
        f"  data     {cfg.data.name} root={cfg.data.root} download={cfg.data.download}",
        f"  teacher  {teacher}",
        f"  student  {cfg.student.model}; methods {methods}; ce_weight {cfg.ce_weight}",
        f"  optim    {t.optimizer} lr {t.lr} momentum {t.momentum} wd {t.weight_decay} batch {t.batch_size}, "
        f"{t.epochs} epochs, {t.schedule} x{t.gamma} at {t.milestones}",
        f"  run      seeds {cfg.seeds}, ray.num_workers {cfg.ray.num_workers} "
        f"({'in-process' if cfg.ray.num_workers == 0 else 'Ray Train'}), use_gpu {cfg.ray.use_gpu}, "
        f"output {cfg.run_dir()}",
        "  stages   " + ", ".join(f"{s.name} ({s.kind})" for s in plan_stages(cfg)),
    ]
    return "\n".join(lines)


def result_rows(pair: str, method: str, result) -> list[str]:
    pub = PUBLISHED[pair]

    def row(what: str, accs: list[float], published: float | None, note: str | None = None) -> str:
        if not accs:
            return ""
        mean = 100 * statistics.mean(accs)
        std = f" +- {100 * statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
        diff = f"{mean - published:+.2f}" if published is not None else "-"
        ref = f"{published:.2f}" if published is not None else "-"
        seeds = note or f"{len(accs)} seed{'s' if len(accs) > 1 else ''}"
        return f"| {pair} | {what} | {mean:.2f}{std} ({seeds}) | {ref} | {diff} |"

    given = any(s.get("name") is None for s in result.stages if s["kind"] == "teacher")
    rows = [row("teacher", result.accuracies("teacher"), pub["teacher"], "checkpoint" if given else "trained"),
            row("student from scratch", result.accuracies("scratch"), pub["scratch"]),
            row(method, result.accuracies("distill"), pub.get(method))]
    return [r for r in rows if r]


def checkpoint_teacher_top1(cfg) -> float:
    """Test top-1 of a teacher given by checkpoint (a check that it loaded right: same normalisation, classes)."""
    import torch
    from torch.utils.data import DataLoader

    from kdray.algorithms.engine import evaluate
    from kdray.models import create_model
    from kdray.orchestrator.build import build_splits
    from kdray.orchestrator.weights import load_weights

    splits = build_splits(cfg)
    model = create_model(cfg.teacher.model, splits.num_classes, **cfg.teacher.args)
    state = torch.load(cfg.teacher.checkpoint, map_location="cpu", weights_only=True)
    model = load_weights(model, state, f"teacher.checkpoint {cfg.teacher.checkpoint}", splits.num_classes)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = DataLoader(splits.test, batch_size=256, num_workers=cfg.data.loader_workers)
    return evaluate(model.to(device), loader, device, splits.num_classes)["top1"]


def main(argv=None) -> int:
    args = parse_args(argv)
    pairs = list(PAIRS) if args.pair == "all" else [args.pair]
    checkpoints = teacher_checkpoints(args, pairs)
    from kdray.config import ConfigError

    try:  # every config is validated before anything trains; a bad one is a one-line error
        configs = {pair: build_config(pair, args, checkpoints) for pair in pairs}
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    for pair, cfg in configs.items():
        print(plan_text(pair, cfg))
        pub = PUBLISHED[pair]
        print(f"  published teacher {pub['teacher']}, scratch {pub['scratch']}, {args.method} {pub[args.method]}\n")
    if args.dry_run:
        print("dry run: configs valid; nothing trained")
        return 0

    import kdray
    from kdray.orchestrator.api import DistillResult

    table = ["| pair | model | kdray test top-1 (%) | published (%) | kdray - published |", "|---|---|---|---|---|"]
    for pair, cfg in configs.items():
        result = kdray.distill(cfg)
        if cfg.teacher.checkpoint:  # no teacher stage in the job: evaluate the given weights once
            result.stages.insert(0, {"kind": "teacher", "test_top1": checkpoint_teacher_top1(cfg)})
        table += result_rows(pair, args.method, result)
        print(result.table() if not cfg.teacher.checkpoint else
              DistillResult(result.stages[1:], None, None, result.run_dir).table())
    print("\nCIFAR-100, CRD protocol (published: CRD paper Table 1, best epoch; kdray: last epoch)")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
