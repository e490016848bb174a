"""Text-classification KD on a real corpus through ``kdray.distill``: all-MiniLM-L6-v2, fine-tuned on a few
hundred labelled Rotten Tomatoes sentences, teaches Tang et al.'s BiLSTM on those plus a transfer set of
sentences whose labels are dropped, offline (``kd``) and with two teachers (``multi_teacher``), against the same
BiLSTM trained from the labelled sentences alone with as many optimizer steps.

Why through the public API: the figures then measure kdray's real path (config validation, preflight, the
teacher stage, the transfer set, the offline and multi-teacher runners, the training loop), not a hand-written loop.

The jobs (in-process, ``ray.num_workers: 0``, MLflow off, everything under ``--workdir``), on one data split
(``rotten_tomatoes`` seeded subset of ``limit`` sentences, ``labelled`` of its training rows keep their labels)
shared by every seed and job, so the comparison is paired: seed ``s`` of a taught student against seed ``s`` of
the label-only one:

1. ``offline-kd``: the teacher stage fine-tunes the pretrained ``all_minilm_l6_v2`` (classification head) on
   the labelled rows; per seed, the BiLSTM from labels alone (the baseline) and the BiLSTM taught by Hinton
   ``kd`` on labelled + transfer rows. The trained teacher's weights are then written to ``teacher.pt`` (a plain
   state_dict, read back with ``weights_only=True``) so the next job reuses it instead of fine-tuning it again.
2. ``multi-teacher``: ``teachers: [that MiniLM teacher, a 4-layer MiniLM (its layers 0-3) fine-tuned here on the
   labelled rows]``, combined by ``mean``, taught with ``kd``. Run alone (``--jobs multi-teacher``), it
   fine-tunes its MiniLM teacher itself and trains its own baseline.

Run: ``python bench/text_classification.py [--quick] [--seeds ..] [--jobs ..] [--workdir DIR]`` (one intra-op
thread). The report is printed at the end and written to ``<workdir>/report.json``.

Measured 2026-12-06 on the project's shared 2-core CPU box (torch 2.14.1, transformers 5.25; the default and
``--quick`` run side by side, so the times are of a shared machine), test top-1 per seed 0 / 1 / 2:

| run | teachers | label-only BiLSTM | ``kd`` offline (gain, pp) | ``multi_teacher`` ``kd`` (gain, pp) |
|---|---|---|---|---|
| default: 3,000 sentences, 500 labelled + 1,600 transfer, 600 test; 4 epochs | MiniLM 74.3, its layers 0-3 68.7 | 56.0 / 60.5 / 63.2 | 64.7 / 65.0 / 64.3 (+8.7, +4.5, +1.2; mean +4.8) | 65.0 / 65.2 / 67.2 (+9.0, +4.7, +4.0; mean +5.9) |
| ``--quick``: 2,000 sentences, 500 labelled + 900 transfer, 400 test; 3 epochs | MiniLM 78.3, layers 0-3 65.0 | 56.3 / 59.8 / 55.8 | 62.8 / 62.8 / 60.3 (+6.5, +3.0, +4.5; mean +4.7) | 61.0 / 61.8 / 62.5 (+4.7, +2.0, +6.8; mean +4.5) |

Every seed of every taught student beats its label-only seed. Times: default 1,130 s + 1,114 s, ``--quick``
570 s + 607 s (most of it the teachers' forward passes, once per epoch per seed). With 400 labelled sentences
(``--quick`` before) the 4-layer second teacher stayed at 50 % (one class) and still the two-teacher students
gained +4.5 / +5.8 / +10.7 pp from the MiniLM half of the mean.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import kdray
from kdray.orchestrator.run_dir import RunDir, read_checkpoint

TEACHER = {"model": "all_minilm_l6_v2", "args": {"head": "classification"}}
SECOND_TEACHER = {"model": "hf_text", "args": {"teacher": "all_minilm_l6_v2", "init_from_teacher": [0, 1, 2, 3],
                                               "head": "classification"}}
STUDENT = {"model": "text_bilstm", "args": {"embedding_dim": 128, "hidden_size": 128, "mlp_size": 128}}


def settings(quick: bool) -> dict:
    """Data sizes, epochs and seeds of a default (bench, = examples/text_rotten_tomatoes_transfer.yaml) or
    ``--quick`` (the slow test's) run."""
    if quick:
        return {"seeds": [0, 1, 2], "limit": 2000, "labelled": 500, "max_length": 48, "teacher_epochs": 3,
                "student_epochs": 3}
    return {"seeds": [0, 1, 2], "limit": 3000, "labelled": 500, "max_length": 64, "teacher_epochs": 3,
            "student_epochs": 4}


def base_job(name: str, workdir: Path, s: dict) -> dict:
    """The parts every job shares: data, student, optimiser, in-process placement, MLflow off."""
    return {
        "name": name,
        "output_dir": str(workdir / "runs"),
        "data": {"name": "rotten_tomatoes",
                 "options": {"tokenizer": "all_minilm_l6_v2", "limit": s["limit"], "labelled": s["labelled"],
                             "max_length": s["max_length"]},
                 "loader_workers": 0},  # tokenised in memory: worker processes would only add start-up
        "student": STUDENT,
        "train": {"epochs": s["student_epochs"], "optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.01,
                  "batch_size": 16},
        "seeds": list(s["seeds"]),
        "checkpoint": {"every_epochs": 1000},  # one checkpoint per stage, at its end
        "ray": {"num_workers": 0},
        "mlflow": {"enabled": False},
    }


def teacher_train(s: dict) -> dict:
    return {"epochs": s["teacher_epochs"], "optimizer": "adamw", "lr": 5e-5, "weight_decay": 0.01, "batch_size": 16}


def kd_method() -> dict:
    return {"name": "kd", "alpha": 0.9, "temperature": 2.0}


JOBS = ("offline-kd", "multi-teacher")


def jobs(workdir: Path, s: dict, only: tuple[str, ...] = JOBS) -> list[tuple[str, dict]]:
    """The bench's jobs in order; ``multi-teacher`` reads ``<workdir>/teacher.pt`` that ``offline-kd`` leaves.
    Without ``offline-kd`` (``only``), ``multi-teacher`` fine-tunes its MiniLM teacher itself and gets its own
    baseline."""
    teacher_file = str(workdir / "teacher.pt")
    reuse = "offline-kd" in only
    minilm = {**TEACHER, "checkpoint": teacher_file} if reuse else {**TEACHER, "train": teacher_train(s)}
    out = []
    if reuse:
        first = base_job("offline-kd", workdir, s)
        first.update(teacher={**TEACHER, "train": teacher_train(s)}, methods=[kd_method()], baseline=True)
        out.append(("offline-kd", first))
    if "multi-teacher" in only:
        multi = base_job("multi-teacher", workdir, s)
        multi.update(scheme="multi_teacher", teachers=[minilm, {**SECOND_TEACHER, "train": teacher_train(s)}],
                     ensemble={"combine": "mean"}, methods=[kd_method()], baseline=not reuse)
        out.append(("multi-teacher", multi))
    return out


def save_teacher(cfg: dict, path: Path) -> None:
    """The teacher stage's weights of a finished job, as a plain state_dict file (atomic: write, then rename)."""
    job_dir = RunDir(str(Path(cfg["output_dir"]) / cfg["name"]), cfg["name"])
    state = read_checkpoint(job_dir.checkpoint_file()).state.weights["teacher"]
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def spread(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values), "values": values}


def summarise(rows: list[dict]) -> dict:
    """Per student (``scratch``, ``kd``, ...): test top-1 mean / min / max, the gain over scratch in percentage
    points (mean of the paired per-seed differences) and whether every seed beats its scratch seed."""
    by = {}
    for row in rows:
        if row["kind"] in ("scratch", "distill"):
            label = "scratch" if row["kind"] == "scratch" else row["label"]
            by.setdefault(label, {})[row["seed"]] = row["test_top1"]
    scratch = by.get("scratch", {})
    out = {}
    for label, accs in by.items():
        seeds = sorted(accs)
        entry = spread([accs[k] for k in seeds])
        if label != "scratch" and scratch:
            diffs = [100 * (accs[k] - scratch[k]) for k in seeds if k in scratch]
            entry["gain_pp"] = statistics.mean(diffs)
            entry["gain_pp_per_seed"] = diffs
            entry["every_seed_beats_scratch"] = all(d > 0 for d in diffs)
        out[label] = entry
    teachers = [r for r in rows if r["kind"] == "teacher"]
    out["teachers"] = {f"{r['job']}:{r['name']}": r["test_top1"] for r in teachers}
    return out


def run(workdir: Path, quick: bool = False, seeds: list[int] | None = None, only: tuple[str, ...] = JOBS,
        log=print) -> dict:
    """Run the jobs and return their summary (see :func:`summarise`) with the rows and timings."""
    torch.set_num_threads(1)
    s = settings(quick)
    if seeds:
        s["seeds"] = list(seeds)
    rows, seconds = [], {}
    for name, cfg in jobs(workdir, s, tuple(only)):
        start = time.perf_counter()
        result = kdray.distill(cfg, quiet=True, log=lambda *_: None)
        seconds[name] = time.perf_counter() - start
        label = "multi_teacher_kd" if cfg.get("scheme") == "multi_teacher" else "+".join(
            m["name"] for m in cfg["methods"])
        for row in result.stages:
            rows.append({"job": name, "name": row["name"], "kind": row["kind"], "seed": row["seed"],
                         "test_top1": row["test_top1"], "params": row.get("params"), "label": label})
        if name == "offline-kd":
            save_teacher(cfg, workdir / "teacher.pt")
        log(f"{name}: {seconds[name]:.0f} s; " + ", ".join(f"{r['name']} {r['test_top1']:.3f}"
                                                          for r in rows if r["job"] == name))
    summary = summarise(rows)
    return {"settings": s, "summary": summary, "rows": rows,
            "seconds": seconds, "machine": {"python": platform.python_version(), "torch": torch.__version__,
                                            "cpu": platform.processor() or platform.machine(),
                                            "threads": torch.get_num_threads()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the slow test's run (2,000 sentences, 3 epochs)")
    parser.add_argument("--workdir", help="where the jobs write (default: a new temporary directory)")
    parser.add_argument("--seeds", type=int, nargs="+", help="student seeds (default 0 1 2)")
    parser.add_argument("--jobs", nargs="+", choices=JOBS, default=list(JOBS), help="run only these jobs")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kdray-textcls-"))
    workdir.mkdir(parents=True, exist_ok=True)
    import transformers

    print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"kdray {getattr(kdray, '__version__', '?')}, {os.cpu_count()} CPUs, workdir {workdir}")
    report = run(workdir, args.quick, args.seeds, tuple(args.jobs))
    (workdir / "report.json").write_text(json.dumps(report, indent=2))
    print("| student | test top-1 mean (min - max) | gain vs scratch (pp) | every seed beats scratch |")
    print("|---|---|---|---|")
    for label, e in report["summary"].items():
        if label == "teachers":
            continue
        gain = f"{e['gain_pp']:+.2f} ({', '.join(f'{d:+.1f}' for d in e['gain_pp_per_seed'])})" if "gain_pp" in e \
            else "-"
        beats = {True: "yes", False: "no"}.get(e.get("every_seed_beats_scratch"), "-")
        print(f"| {label} | {100 * e['mean']:.2f} ({100 * e['min']:.2f} - {100 * e['max']:.2f}) | {gain} | {beats} |")
    for name, acc in report["summary"]["teachers"].items():
        print(f"teacher {name}: test top-1 {100 * acc:.2f}")
    print("seconds per job:", {k: round(v) for k, v in report["seconds"].items()})


if __name__ == "__main__":
    main()
