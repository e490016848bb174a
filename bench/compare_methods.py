"""Every registered method on one teacher/student pair on digits, over seeds, against the student from scratch.

Setup: teacher ``digits_cnn`` (width 16) trained once on the whole digits training split and saved as a
state_dict, then used by every job through ``teacher: {model, checkpoint}``; student ``digits_cnn``
(``--student-width``, default 4) trained on ``--train-fraction`` (default 0.2) of that split, so the
student is data-starved and the teacher knows more than the labels say. Every method is one
``kdray.distill`` job, in-process (``ray.num_workers: 0``), with the same optimiser, epochs and seeds;
the first job also trains the students from scratch (``baseline: true``).

Weights: published CIFAR-100 weights were tuned for other feature sizes, batch sizes and class counts,
so on digits some terms start 1000x larger than the CE and some 1000x smaller. Each term is therefore
measured at initialisation (student at its seed-0 init, trained teacher, ``--measure-batches`` training
batches, at the epoch where the term is at full strength: after DKD / ReviewKD warm-up, after the FT
paraphraser phase) with its published default weight, and the weight is scaled by ``CE / term`` (two
significant digits) so the term starts at about the CE's size. ``kd`` and ``tfkd``'s ``alpha`` are
convex CE/soft mixes and are not rescaled (``tfkd``'s separate ``weight`` is). The scale and the
weight used are recorded per method. Methods with a pre-training phase (``ab`` init, ``fitnet``
hints, ``ft`` paraphraser) get ``--phase-epochs`` (5) of it *in addition* to ``--epochs``, so every
student gets the same number of epochs with the CE (the library counts phases inside the run, hence
``epochs + phase``); the 20-of-240-epoch warm-ups of ``dkd`` / ``reviewkd`` are scaled to the run
(``round(20 * epochs / 240)``, at least 1).

Output: a markdown table (method, kind, weight used, test top-1 mean +- std over seeds, delta vs
scratch, seconds per epoch) printed and written to ``docs/methods.md`` (only for a full run unless
``--output``); one MLflow parent run with every job nested under it, a bar chart and the table.

Resumable: each finished row (and the scratch baseline) is saved as JSON under ``--workdir``
(``results/<row>.json``, beside the teacher and a ``settings.json`` of the protocol's arguments); a run
given the same ``--workdir`` reuses the teacher and every saved row and trains only the missing ones, so
adding a method to the table costs that method's jobs alone. Different protocol arguments with the same
folder are refused in one line (they would mix incomparable rows).

Run: ``python bench/compare_methods.py [--seeds 3] [--epochs 30] [--methods kd,crd] [--mlflow URI]
[--workdir DIR]``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import header  # noqa: E402

# Combined rows: several methods in one config, each with the weight found for it alone.
COMBOS = [("kd", "crd")]
# Pre-training phases (parameter -> epochs): given --phase-epochs, added to the run's epochs.
PHASES = {"ab": "init_epochs", "fitnet": "hint_epochs", "ft": "paraphraser_epochs"}
# Warm-up ramps published as 20 of 240 epochs: scaled to the run's length.
WARMUPS = {"dkd": "warmup", "reviewkd": "warmup_epochs"}
# Convex CE / soft-target mixes: the soft term is not rescaled.
NOT_SCALED = {"kd", "ctkd", "mlkd", "messy_collab", "probability_shift", "label_smoothing"}
# Methods without one `weight` parameter: the parameters that weight their parts, scaled together.
WEIGHT_PARAMS = {"dist": ("beta", "gamma"), "dist_plus": ("beta", "gamma", "iota", "kappa"),
                 "skd": ("instance_weight", "direction_weight"), "srrl": ("feature_weight", "sr_weight"),
                 "wsld": ("alpha",)}
# SSKD's three distillation weights scale together (its CE weight stays). cs_kd and mean_teacher have no `weight`:
# their terms are ~0 at initialisation by construction (a network matching itself), so they keep their defaults.
WEIGHT_PARAMS["sskd"] = ("kd_weight", "tf_weight", "ss_weight")
KIND_ORDER = {"response": 0, "feature": 1, "relation": 2}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- compare_methods:begin -->", "<!-- compare_methods:end -->"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    p.add_argument("--epochs", type=int, default=30, help="student epochs with the CE (phases come on top)")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods and combos (a+b); default: every registered method + kd+crd")
    p.add_argument("--mlflow", default=None, help="tracking URI (default sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--experiment", default="kdray-compare-methods")
    p.add_argument("--student-width", type=int, default=4)
    p.add_argument("--train-fraction", type=float, default=0.2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--teacher-epochs", type=int, default=40)
    p.add_argument("--teacher", default=None, help="reuse this digits_cnn(width 16) state_dict instead of training")
    p.add_argument("--phase-epochs", type=int, default=5)
    p.add_argument("--measure-batches", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these tiny models)")
    p.add_argument("--workdir", default=None, help="job folders and the teacher (default kdray-runs/compare-<time>)")
    p.add_argument("--output", default=None, help="markdown file to write (default docs/methods.md on a full run)")
    p.add_argument("--verbose", action="store_true", help="print every epoch")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------- helpers
def round_sig(x: float, digits: int = 2) -> float:
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def fmt_num(x: float) -> str:
    return f"{x:.3g}" if x != 0 and (abs(x) < 1e-2 or abs(x) >= 1e4) else f"{x:g}"


def label(methods: tuple[str, ...]) -> str:
    return "+".join(methods)


def job_name(methods: tuple[str, ...]) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", "-".join(methods))


def selected_rows(spec: str | None, registered: dict) -> list[tuple[str, ...]]:
    if spec is None:
        image = [m for m in registered if registered[m].modality != "text"]  # the digits bench runs image terms
        rows = [(m,) for m in sorted(image, key=lambda m: (KIND_ORDER[registered[m].kind], m))]
        return rows + [c for c in COMBOS if all(m in registered for m in c)]
    rows = []
    for item in spec.split(","):
        parts = tuple(x.strip() for x in item.split("+") if x.strip())
        unknown = [m for m in parts if m not in registered]
        if unknown:
            raise SystemExit(f"unknown method(s) {unknown}; registered: {', '.join(registered)}")
        if parts:
            rows.append(parts)
    return rows


def base_params(name: str, args) -> dict:
    """The method's parameters for this job, before weight scaling (phases and warm-ups shortened)."""
    params = {}
    if name in PHASES:
        params[PHASES[name]] = args.phase_epochs
    if name in WARMUPS:
        params[WARMUPS[name]] = max(1, round(20 * args.epochs / 240))
    return params


def measure_epoch(name: str, params: dict) -> int:
    """The epoch at which the term is at full strength with its weight applied."""
    if name == "ft":
        return params["paraphraser_epochs"]  # before: the (unweighted) paraphraser loss
    if name in WARMUPS:
        return params[WARMUPS[name]]
    return 0  # ab: its weighted loss is the init phase; fitnet: the same hint in both phases


def data_options(args) -> dict:
    return {"train_fraction": args.train_fraction}


# --------------------------------------------------------------------------------------- teacher
def train_teacher(args, path: str, log) -> float:
    """Train digits_cnn(width 16) on the whole digits training split once; save its state_dict; test top-1."""
    from torch.utils.data import DataLoader

    from kdray.algorithms.distiller import Distiller
    from kdray.algorithms.engine import TrainLoop, evaluate, seed_everything
    from kdray.algorithms.optim import make_optimizer, make_schedule
    from kdray.data import build_datasets
    from kdray.models import create_model

    seed_everything(0)
    splits = build_datasets("digits")
    model = create_model("digits_cnn", splits.num_classes, width=16)
    if args.teacher:
        model.load_state_dict(torch.load(args.teacher, map_location="cpu", weights_only=True))
    else:
        train = DataLoader(splits.train, batch_size=args.batch_size, shuffle=True,
                           generator=torch.Generator().manual_seed(0))
        val = DataLoader(splits.val, batch_size=256)
        opt = make_optimizer(Distiller(model).parameters(), "sgd", args.lr, 5e-4, 0.9)
        TrainLoop(Distiller(model), None, opt, make_schedule(opt, "cosine", args.teacher_epochs), train, val,
                  splits.num_classes, args.teacher_epochs, "cpu").run()
    torch.save(model.state_dict(), path)
    acc = evaluate(model, DataLoader(splits.test, batch_size=256), "cpu", splits.num_classes)["top1"]
    log(f"teacher digits_cnn(width 16): {len(splits.train)} training images, test top-1 {acc:.4f} -> {path}")
    return acc


# ------------------------------------------------------------------------------------ weight scale
def measure_terms(names: list[str], args, teacher_path: str) -> dict[str, dict]:
    """Each term's value at initialisation with its published weight, and the CE's, on the same batches."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from kdray.algorithms import create_method
    from kdray.algorithms.base import get_method, method_params
    from kdray.algorithms.base import Batch
    from kdray.algorithms.distiller import Distiller, Teacher
    from kdray.algorithms.engine import seed_everything
    from kdray.data import ClassPairBatchSampler, build_datasets
    from kdray.data.two_views import split_targets
    from kdray.models import create_model

    splits = build_datasets("digits", **data_options(args))
    loader = DataLoader(splits.train, batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    batches = [next(it) for _ in range(min(args.measure_batches, len(loader)))]
    example = torch.stack([splits.train[i][0] for i in range(2)])  # what the job builds connectors with
    pair_batches = None  # CS-KD reads class pairs: the job's loaders make them, so its measurement does too
    out = {}
    for name in names:
        if get_method(name).needs_class_pairs and pair_batches is None:
            pairs = DataLoader(splits.train, batch_sampler=ClassPairBatchSampler(split_targets(splits.train),
                                                                                 args.batch_size, 0))
            pair_batches = [b for b, _ in zip(pairs, range(args.measure_batches))]
        term_batches = pair_batches if get_method(name).needs_class_pairs else batches
        params = base_params(name, args)
        signature = method_params(name)
        published = {k: signature[k].default for k in WEIGHT_PARAMS.get(name, ("weight",)) if k in signature}
        seed_everything(0)
        student = create_model("digits_cnn", splits.num_classes, width=args.student_width)
        distiller = Distiller(student, [create_method(name, **params)])
        teacher_model = create_model("digits_cnn", splits.num_classes, width=16)
        teacher_model.load_state_dict(torch.load(teacher_path, map_location="cpu", weights_only=True))
        teacher = Teacher(teacher_model, distiller.resolve_teacher_points(teacher_model))
        distiller.build(example, teacher, len(splits.train))
        distiller.set_epoch(measure_epoch(name, params))
        distiller.train()
        term_sum = ce_sum = 0.0
        with torch.no_grad():
            for x, y, idx in term_batches:
                logits, losses = distiller(Batch(x, y, idx), teacher(x))
                term_sum += float(sum(v for k, v in losses.items() if k != "ce"))
                ce_sum += float(F.cross_entropy(logits, y))
        term, ce = term_sum / len(term_batches), ce_sum / len(term_batches)
        row = {"published": published, "term": term, "ce": ce, "params": params}
        if name in NOT_SCALED or not published:
            row.update(scale=None, weight={})
        elif not (math.isfinite(term) and term > 0):
            row.update(scale=1.0, weight=dict(published))  # cannot scale (e.g. a term that can be negative)
        else:
            row["scale"] = round_sig(ce / term)
            row["weight"] = {k: round_sig(v * row["scale"]) for k, v in published.items()}
        out[name] = row
    return out


# ------------------------------------------------------------------------------------------- jobs
def job_config(methods: tuple[str, ...], weights: dict, args, teacher_path: str, uri: str, workdir: str,
               baseline: bool) -> dict:
    specs = []
    extra_epochs = 0
    for name in methods:
        params = dict(weights[name]["params"])
        params.update(weights[name]["weight"])
        if name in PHASES:
            extra_epochs = max(extra_epochs, params[PHASES[name]])
        specs.append({"name": name, **params})
    epochs = args.epochs + extra_epochs
    return {
        "name": job_name(methods),
        "output_dir": workdir,
        "data": {"name": "digits", "options": data_options(args)},
        "teacher": {"model": "digits_cnn", "args": {"width": 16}, "checkpoint": teacher_path},
        "student": {"model": "digits_cnn", "args": {"width": args.student_width}},
        "methods": specs,
        "train": {"epochs": epochs, "batch_size": args.batch_size, "lr": args.lr, "momentum": 0.9,
                  "weight_decay": 5e-4, "schedule": "cosine"},
        "seeds": list(range(args.seeds)),
        "baseline": baseline,
        "checkpoint": {"every_epochs": epochs},
        "ray": {"num_workers": 0},
        "mlflow": {"tracking_uri": uri, "experiment": args.experiment},
    }


def weights_text(name: str, weights: dict) -> str:
    """``0.5`` for a single ``weight``, ``beta 0.5, gamma 0.5`` for several, ``defaults`` for none."""
    if name == "kd":
        return "alpha 0.9"
    if not weights:
        return "defaults"
    if list(weights) == ["weight"]:
        return fmt_num(weights["weight"])
    return ", ".join(f"{k} {fmt_num(v)}" for k, v in weights.items())


def weight_text(methods: tuple[str, ...], weights: dict) -> str:
    parts = [weights_text(m, weights[m]["weight"]) for m in methods]
    return parts[0] if len(parts) == 1 else ", ".join(f"{m} {p}" for m, p in zip(methods, parts))


def summarise(accs: list[float]) -> tuple[float, float]:
    return statistics.mean(accs), (statistics.stdev(accs) if len(accs) > 1 else 0.0)


def table(rows: list[dict], scratch: dict) -> str:
    s_mean = scratch["mean"]
    out = ["| method | kind | weight used | test top-1 (%) | delta vs scratch (pp) | s / epoch |",
           "|---|---|---|---|---|---|"]
    out.append(f"| scratch (baseline) | - | - | {100 * s_mean:.2f} +- {100 * scratch['std']:.2f} | 0 | "
               f"{scratch['sec']:.2f} |")
    for r in rows:
        out.append(f"| {r['label']} | {r['kind']} | {r['weight_text']} | {100 * r['mean']:.2f} +- "
                   f"{100 * r['std']:.2f} | {100 * (r['mean'] - s_mean):+.2f} | {r['sec']:.2f} |")
    return "\n".join(out)


def weights_table(weights: dict) -> str:
    out = ["| method | published weight | term at init (published weight) | CE at init | scale | weight used | "
           "other settings |", "|---|---|---|---|---|---|---|"]
    for name, w in weights.items():
        other = ", ".join(f"{k}={v}" for k, v in w["params"].items()) or "-"
        if name == "kd":
            published, scale, used = "alpha 0.9 (T 4)", "not scaled", "alpha 0.9"
        elif not w["weight"]:  # a convex CE / soft mix, or no weight parameter: the method's defaults
            published, scale, used = weights_text(name, w["published"]), "not scaled", "defaults"
        else:
            published = weights_text(name, w["published"])
            scale = f"{w['scale']:.3g}" if w["scale"] is not None else "-"
            used = weights_text(name, w["weight"])
        out.append(f"| {name} | {published} | {w['term']:.4g} | {w['ce']:.3f} | {scale} | {used} | {other} |")
    return "\n".join(out)


def write_doc(path: str, body: str) -> None:
    """Replace the generated block between the markers, keeping hand-written text around it."""
    block = f"{BEGIN}\n{body.rstrip()}\n{END}\n"
    if os.path.exists(path):
        with open(path) as fh:
            text = fh.read()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            tail = rest.split(END, 1)[1].lstrip("\n")
            block = head + block + ("\n" + tail if tail else "")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(block)


# Arguments that change a row's numbers: a saved row is reused only under the same values.
PROTOCOL = ("seeds", "epochs", "student_width", "train_fraction", "batch_size", "lr", "teacher_epochs", "teacher",
            "phase_epochs", "measure_batches", "threads")


def check_settings(workdir: str, args) -> None:
    """Write ``settings.json`` on the first run in ``workdir``; later runs must match it (one line if not)."""
    path = os.path.join(workdir, "settings.json")
    settings = {k: getattr(args, k) for k in PROTOCOL}
    if os.path.exists(path):
        with open(path) as fh:
            saved = json.load(fh)
        changed = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
        if changed:
            raise SystemExit(f"{workdir} holds rows measured with other settings {changed} (saved, now); "
                             f"use another --workdir or the same settings")
    else:
        write_json(path, settings)


def write_json(path: str, data: dict) -> None:
    """Atomically: a killed run leaves either the old file or the new one, never half of one."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1)
    os.replace(tmp, path)


def saved_row(workdir: str, key: str, weight_text_now: str | None = None) -> dict | None:
    """The saved result of ``key`` (a row's job name, or ``scratch``), if its weights are still the same."""
    path = os.path.join(workdir, "results", f"{key}.json")
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        row = json.load(fh)
    if weight_text_now is not None and row.get("weight_text") != weight_text_now:
        return None  # the term's measured weight changed (its code changed): measure it again
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    import kdray
    from kdray.algorithms import list_methods
    from kdray.orchestrator.plots import grouped_bars
    from kdray.orchestrator.tracking import experiment_id, flatten, resolve_tracking_uri

    registered = list_methods()
    rows_spec = selected_rows(args.methods, registered)
    output = args.output or (os.path.join(ROOT, "docs", "methods.md") if args.methods is None else None)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = os.path.abspath(args.workdir or os.path.join("kdray-runs", f"compare-{stamp}"))
    os.makedirs(workdir, exist_ok=True)
    check_settings(workdir, args)
    uri = resolve_tracking_uri(args.mlflow or f"sqlite:///{os.path.join(os.getcwd(), 'mlflow.db')}")
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f}s] {msg}", flush=True)

    client = MlflowClient(uri)
    exp = experiment_id(client, args.experiment, uri)
    parent = client.create_run(exp, run_name=f"compare-methods-{stamp}", tags={"kdray.role": "comparison"})
    parent_id = parent.info.run_id
    try:
        client.log_batch(parent_id, params=[Param(k, v) for k, v in flatten("", vars(args), {}).items()])
        teacher_path = os.path.join(workdir, "teacher_digits_cnn_w16.pt")
        if os.path.exists(teacher_path) and not args.teacher:
            args.teacher = teacher_path  # resumed: the same (seeded) teacher, not trained again
        teacher_acc = train_teacher(args, teacher_path, log)
        client.log_metric(parent_id, "teacher_test_top1", teacher_acc)
        from kdray.data import build_datasets

        student_splits = build_datasets("digits", **data_options(args))
        n_train, n_test = len(student_splits.train), len(student_splits.test)

        names = list(dict.fromkeys(m for row in rows_spec for m in row))
        weights = measure_terms(names, args, teacher_path)
        for name, w in weights.items():
            scale = (f"scale {w['scale']:.3g} -> {weights_text(name, w['weight'])}" if w["scale"] is not None
                     else "not scaled")
            log(f"{name:>15}: term at init {w['term']:.4g} (published weight {w['published']}), "
                f"CE {w['ce']:.3f}; {scale}")
            for param, value in w["weight"].items():
                client.log_metric(parent_id, f"weight.{name}.{param}", value)

        results = []
        scratch = saved_row(workdir, "scratch")
        for methods in rows_spec:
            key, text = job_name(methods), weight_text(methods, weights)
            row = saved_row(workdir, key, text)
            if row is not None:
                log(f"{label(methods):>15}: test top-1 {100 * row['mean']:.2f} +- {100 * row['std']:.2f}  (saved)")
            else:
                baseline = scratch is None
                cfg = job_config(methods, weights, args, teacher_path, uri, workdir, baseline=baseline)
                t0 = time.perf_counter()
                quiet = print if args.verbose else (lambda msg: None)
                res = kdray.distill(cfg, log=quiet, parent_run_id=parent_id)
                accs = res.accuracies("distill")
                secs = [s["epoch_time_s"] for s in res.stages if s["kind"] == "distill"]
                if baseline:
                    s_accs = res.accuracies("scratch")
                    s_mean, s_std = summarise(s_accs)
                    scratch = {"mean": s_mean, "std": s_std, "accs": s_accs,
                               "sec": statistics.mean(s["epoch_time_s"] for s in res.stages if s["kind"] == "scratch")}
                    write_json(os.path.join(workdir, "results", "scratch.json"), scratch)
                mean, std = summarise(accs)
                kinds = "+".join(dict.fromkeys(registered[m].kind for m in methods))
                row = {"label": label(methods), "kind": kinds, "weight_text": text, "accs": accs, "mean": mean,
                       "std": std, "sec": statistics.mean(secs), "epochs": cfg["train"]["epochs"]}
                write_json(os.path.join(workdir, "results", f"{key}.json"), row)
                log(f"{label(methods):>15}: test top-1 {100 * mean:.2f} +- {100 * std:.2f}  "
                    f"({cfg['train']['epochs']} epochs, {time.perf_counter() - t0:.0f}s)")
            results.append(row)
            client.log_metric(parent_id, f"test_top1_mean.{key}", row["mean"])
        scratch_accs = scratch["accs"]
        client.log_metric(parent_id, "test_top1_mean.scratch", scratch["mean"])
        elapsed = time.perf_counter() - start

        main_table = table(results, scratch)
        setup = (f"Teacher `digits_cnn` (width 16, {teacher_acc * 100:.2f}% test top-1, trained once on the whole "
                 f"digits training split); student `digits_cnn` (width {args.student_width}) on "
                 f"{args.train_fraction:g} of that split ({n_train} images); SGD lr {args.lr} (momentum 0.9, "
                 f"wd 5e-4, cosine), batch {args.batch_size}, {args.epochs} epochs (+{args.phase_epochs} pre-training "
                 f"epochs for {', '.join(PHASES)}); seeds 0..{args.seeds - 1}; test split of {n_test} images "
                 f"(one image = {100 / n_test:.2f} pp); in-process "
                 f"(`ray.num_workers: 0`), {args.threads} torch thread(s).")
        body = "\n\n".join([
            header("kdray methods on digits (bench/compare_methods.py)"),
            setup,
            main_table,
            "Test top-1 is mean +- std over seeds; delta vs scratch is the difference of the means in percentage "
            "points; s / epoch is the mean wall time of an epoch (training + validation) of the distilled "
            f"student on a shared machine. This run: {elapsed / 60:.1f} min (rows saved by earlier runs in the same "
            "--workdir are reused, not timed again).",
            "Weights: each term measured at initialisation with its published weight, then scaled to the CE's "
            "size (see the docstring of bench/compare_methods.py):",
            weights_table(weights),
        ])
        print("\n" + body)
        client.log_text(parent_id, body, "methods.md")
        groups = {"scratch": scratch_accs, **{r["label"]: r["accs"] for r in results}}
        client.log_figure(parent_id, grouped_bars(groups, "test top-1", "kdray methods on digits (mean +- std)"),
                          "methods_test_top1.png")
        if output:
            write_doc(output, body)
            print(f"\nwrote {output}")
        client.set_terminated(parent_id, "FINISHED")
        print(f"MLflow: {uri}, experiment {args.experiment!r}, parent run {parent_id}")
        return 0
    except BaseException:
        client.set_terminated(parent_id, "KILLED" if sys.exc_info()[0] is KeyboardInterrupt else "FAILED")
        raise


if __name__ == "__main__":
    sys.exit(main())
