"""Block-wise NAS-guided distillation (DNA, Li et al. CVPR 2020) on Ray Tune + Optuna: ``kdray.block_search``
and ``kdray nas FILE.yaml``.

1. Everything checkable runs before any training: the cuts against the teacher's modules (one line naming
   the nearest valid paths), the candidates' parameter counts against the budget.
2. The base job trains the teacher once (``kdray.distill``, as a sweep's base job does); its weights go to
   ``teacher.pt``. A teacher given by ``teacher.mlflow_uri`` is read from MLflow once, as a job reads it, into
   the same file; ``teacher.checkpoint`` is used as it is.
3. One Tuner whose trials are (block, candidate) pairs: an Optuna ``GridSampler`` over ``block x width x depth
   x kernel`` through Tune's ``OptunaSearch``. One Tuner rather than one per block because the blocks are
   independent searches (no trial of block 1 depends on block 0): a single experiment keeps every core busy
   across block boundaries, resumes as one ``Tuner.restore``, and the grid makes each (block, candidate) pair
   run exactly once (no cross-block modelling). Each trial trains its candidate block on the teacher's block
   input -> output (:func:`kdray.algorithms.blockwise.train_block`) and reports the validation block loss per
   epoch; its result is kept in ``blocks/<block>-<candidate>.json`` so a resumed search trains nothing twice.
4. The assembly minimising the summed block scores within ``budget`` (exhaustive over the product) becomes
   a ``blockwise_student`` and is distilled end to end from the teacher (``kdray.distill``, offline scheme,
   the base job's methods), nested under the search's MLflow run. With ``inherit`` (the default) it starts
   from the weights its blocks learnt in their trials and the teacher's classifier (the blocks end at the
   teacher's channel count, so it fits); DNA retrains the found architecture from scratch instead
   (``inherit: false``). ``compare: k`` distils ``k`` more
   assemblies spread over the score ranking, for the plot of block loss vs final accuracy and its Spearman rho.

``budget`` is a parameter count or ``{params: N, latency_ms: X}``. A latency limit is checked against a table
measured once per search before any training (:func:`latency_table`: each candidate block on its teacher
block's input shape at ``latency_batch``, the median of 30 runs in one CPU thread, and the head); an
assembly's latency is the sum of its blocks' and the head's. The summed estimate ignores what the blocks do
not share (cache, dispatch), so the assembled student is measured too and both are logged.

The search's MLflow parent run holds the per-block scores (metrics and ``block_scores.csv``), the chosen
architecture (params and ``architecture.json``), the figure ``block_loss_vs_accuracy.png`` and the
assembled student's job run below it.
"""
from __future__ import annotations

import copy
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kdray.config import Config, ConfigError, check_job_name, format_error, load_config
from kdray.orchestrator.plan import get_scheme
from kdray.search.spec import base_raw
from kdray.search.tracking import read_state, write_state
from kdray.search.tuning import fit_tuner, open_tracking

STATE_FILE = "nas.json"
BUDGET_KEYS = ("params", "latency_ms")
NAS_STOPPED = ("Ctrl-C: Tune stopped the block search with {ended} of {total} block trials ended; "
               "`kdray nas FILE --resume` (or resume=True) continues it")


class BlockSearchSpec(BaseModel):
    """The ``blocks:`` section of a NAS file (or ``kdray.block_search``'s keyword arguments)."""

    model_config = ConfigDict(extra="forbid")

    cuts: list[str] = Field(min_length=1)  # module paths of the teacher, shallow to deep
    widths: list[int] = Field(default_factory=lambda: [2, 4, 8, 16], min_length=1)
    depths: list[int] = Field(default_factory=lambda: [1, 2], min_length=1)
    kernels: list[int] = Field(default_factory=lambda: [3, 5], min_length=1)
    # the assembled student's parameters (blocks + head), or {params: N, latency_ms: X}: either or both limits,
    # the latency one on the summed CPU latencies of its blocks + head measured at a batch of latency_batch
    budget: int | dict | None = None
    latency_batch: int = Field(64, ge=1)
    epochs: int = Field(10, ge=1)  # per candidate block
    lr: float = Field(1e-2, gt=0)  # Adam
    batch_size: int = Field(32, ge=1)
    seed: int = 0
    max_concurrent: int | Literal["auto"] = "auto"
    compare: int = Field(0, ge=0)  # further assemblies distilled end to end (block loss vs accuracy)
    inherit: bool = True  # start the assembled student from the searched blocks' weights + the teacher's head

    @field_validator("budget", mode="before")
    @classmethod
    def _one_budget(cls, v):
        if v is None:
            return v
        if isinstance(v, dict):
            unknown = sorted(set(v) - set(BUDGET_KEYS))
            if unknown or not v:
                raise ValueError(f"unknown key(s) {unknown}; a budget is a parameter count or a mapping of "
                                 f"{' and/or '.join(BUDGET_KEYS)}" if unknown else
                                 f"an empty mapping; give {' and/or '.join(BUDGET_KEYS)}")
            for key, value in v.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or \
                        (key == "params" and int(value) != value):
                    raise ValueError(f"{key} must be a positive {'integer' if key == 'params' else 'number'}, "
                                     f"got {value!r}")
            return {k: (int(x) if k == "params" else float(x)) for k, x in v.items()}
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError("a budget is a positive parameter count or {params: N, latency_ms: X}")
        return v

    @property
    def params_budget(self) -> int | None:
        return self.budget.get("params") if isinstance(self.budget, dict) else self.budget

    @property
    def latency_budget_ms(self) -> float | None:
        return self.budget.get("latency_ms") if isinstance(self.budget, dict) else None


class NasFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "kdray-nas"
    output_dir: str | None = None
    base: Any
    blocks: BlockSearchSpec


@dataclass
class BlockSearchResult:
    """``scores``: one row per (block, candidate); ``chosen``: the assembly; ``student``: the assembled
    student's ``{model, args}``; ``assembled``: its end-to-end distillation (val/test top-1, params);
    ``candidates``: every assembly distilled (the chosen one first) with its summed block loss;
    ``spearman``: rank correlation of summed block loss and val top-1 over ``candidates`` (negative is good:
    lower loss, higher accuracy); ``cost``: block trial-epochs, end-to-end epochs, wall seconds (``base_s``: the base job that trains the
    teacher; ``trials_s``: the block trials; ``distill_s``: the chosen assembly's distillation; ``compare_s``:
    the compared assemblies'; ``wall_s``: the whole first call)."""

    scores: Any  # pandas.DataFrame
    chosen: dict
    student: dict
    assembled: dict
    candidates: list[dict]
    spearman: float | None
    cost: dict
    base: dict
    path: str
    tracking_uri: str | None = None
    parent_run_id: str | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        a, b = self.assembled, self.base
        rows = ["| | val top-1 | test top-1 | params |", "|---|---|---|---|",
                f"| base student ({b['model']}) | {b['val_top1']:.4f} | {b['test_top1']:.4f} | {int(b['params']):,} |",
                f"| **assembled** {' / '.join(self.chosen['choice'])} | {a['val_top1']:.4f} | {a['test_top1']:.4f} "
                f"| {int(a['params']):,} |"]
        c = self.cost
        lines = ["\n".join(rows), "",
                 f"{len(self.scores)} block trials, {c['block_trial_epochs']} block trial-epochs, "
                 f"{c['distill_epochs']} end-to-end epochs, {c['wall_s']:.1f} s"]
        if "latency_ms" in self.chosen:
            lines.append(f"latency (1 CPU thread): {self.chosen['latency_ms']:.3f} ms measured on the assembled "
                         f"student, {self.chosen['latency_est_ms']:.3f} ms summed over its blocks + head")
        if self.spearman is not None:
            lines.append(f"Spearman rho (summed block loss vs val top-1, {len(self.candidates)} assemblies): "
                         f"{self.spearman:.3f}")
        return "\n".join(lines)


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); ``None`` with fewer than 3 points or no spread."""
    if len(x) < 3:
        return None

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    if sx == 0 or sy == 0:
        return None
    return sum((a - mx) * (b - my) for a, b in zip(rx, ry)) / (sx * sy)


# --- entry points --------------------------------------------------------------------------------
def block_search(base_config, cuts: list[str], *, name: str = "kdray-nas", output_dir: str | None = None,
                 resume: bool = False, log=print, **blocks) -> BlockSearchResult:
    """Block-wise NAS-guided distillation (DNA) of ``base_config``'s teacher: cut it at ``cuts``, score every
    candidate block (``widths``, ``depths``, ``kernels``) by its block loss in Ray Tune trials, assemble the
    best combination within ``budget`` parameters and distil it end to end. Further keyword arguments are
    :class:`BlockSearchSpec` fields (``epochs``, ``lr``, ``max_concurrent``, ``compare``, ...)."""
    try:
        spec = BlockSearchSpec.model_validate({"cuts": cuts, **blocks})
    except ValidationError as err:
        raise ConfigError("blocks." + format_error(err)) from None
    raw = base_config.model_dump(mode="json") if isinstance(base_config, Config) else base_raw(base_config)
    return run_block_search(name, output_dir, raw, spec, resume=resume, log=log)


def nas_file(source: str | dict, overrides: list[str] | None = None, resume: bool = False,
             log=print) -> BlockSearchResult:
    """Run the NAS file ``source`` (``kdray nas FILE.yaml``): ``name``, ``output_dir``, ``base``, ``blocks``."""
    from kdray.config import apply_overrides, read_yaml

    if isinstance(source, str) and not os.path.isfile(source):
        raise ConfigError(f"NAS config {source!r} is not a file")
    where = os.path.dirname(os.path.abspath(source)) if isinstance(source, str) else None
    raw = read_yaml(source) if isinstance(source, str) else copy.deepcopy(source)
    missing = [k for k in ("base", "blocks") if k not in raw]
    if missing:
        raise ConfigError(f"NAS config: missing {', '.join(missing)} (a NAS file has name:, base:, blocks:)")
    if overrides:
        raw = apply_overrides(raw, overrides)
    try:
        spec = NasFile.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_error(err)) from None
    return run_block_search(spec.name, spec.output_dir, base_raw(spec.base, where), spec.blocks, resume=resume,
                            log=log)


# --- the search ----------------------------------------------------------------------------------
def nas_base_config(raw: dict) -> Config:
    """The base job of a block search: an offline job with one teacher, no from-scratch baseline."""
    raw = copy.deepcopy(raw)
    raw["baseline"] = False
    try:
        cfg = load_config(raw)
    except ConfigError as err:
        raise ConfigError(f"base: {err}") from None
    if get_scheme(cfg.scheme).searched_kind is None or cfg.teacher is None or cfg.scheme != "offline":
        raise ConfigError(f"base: block-wise NAS distils from one teacher (scheme offline with teacher:), got "
                          f"scheme {cfg.scheme!r}{'' if cfg.teacher is not None else ' without teacher:'}")
    if cfg.teacher.train is None and cfg.teacher.checkpoint is None and cfg.teacher.mlflow_uri is None:
        raise ConfigError("base.teacher: block-wise NAS cuts the teacher's own modules, so it needs its weights: "
                          "teacher.train (trained by the base job), teacher.checkpoint (a state_dict file) or "
                          "teacher.mlflow_uri (a kdray model in MLflow), not only its cached outputs")
    return cfg


def logged_teacher_state(base: Config, num_classes: int, uri: str | None) -> dict:
    """The weights of a ``teacher.mlflow_uri`` teacher (``runs:/<id>/model`` or ``models:/...``), read as a
    job reads them (:func:`kdray.orchestrator.build.build_teacher_model`: tensors only, its logged model name
    and parameter shapes checked against ``teacher:``), so the block trials can load them from ``teacher.pt``
    without reaching the store."""
    from kdray.orchestrator.build import build_teacher_model
    from kdray.orchestrator.plan import TeacherSource

    model = build_teacher_model(base, TeacherSource("spec", "teacher"), num_classes, {}, uri)
    return model.state_dict()


def validate(base: Config, spec: BlockSearchSpec) -> dict:
    """Cuts, candidates and budget, before any training; each failure one :class:`ConfigError` line."""
    from kdray.algorithms import blockwise as bw
    from kdray.models import create_model
    from kdray.orchestrator.build import build_splits, example_batch

    if any(k % 2 == 0 for k in spec.kernels):
        raise ConfigError(f"blocks.kernels: {spec.kernels} must be odd (same padding)")
    splits = build_splits(base)
    if len(splits.val) == 0:
        raise ConfigError("data: block scores are validation losses but the validation split is empty; "
                          "set data.options.val_fraction > 0")
    example = example_batch(splits.train)
    teacher = create_model(base.teacher.model, splits.num_classes, **base.teacher.args)
    try:
        shapes = bw.cut_teacher(teacher, spec.cuts, example).shapes(example)
    except bw.BlockCutError as err:
        raise ConfigError(str(err)) from None
    choices = bw.candidate_grid(spec.widths, spec.depths, spec.kernels)
    names = [bw.block_name(c) for c in choices]
    params = [{n: bw.block_params(bw.with_interface(c, s)) for n, c in zip(names, choices)} for s in shapes]
    head = bw.head_params(shapes[-1].cout, splits.num_classes)
    try:
        bw.check_budget(params, spec.params_budget, head)
    except bw.BudgetError as err:
        raise ConfigError(str(err)) from None
    return {"num_classes": splits.num_classes, "shapes": [s.__dict__ for s in shapes], "choices": choices,
            "names": names, "params": params, "head_params": head}


def cpu_latency_ms(module, shape: tuple) -> float:
    """Median CPU forward time (ms) of ``module`` on a random batch of ``shape``, 30 runs after 5 warm-up
    runs, in one thread (the sweep's ``latency_ms`` measurement, :func:`kdray.search.trial.measure_latency`):
    one thread so that the table does not depend on how many trials share the machine at that moment."""
    import torch

    from kdray.search.trial import measure_latency

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return measure_latency(module, shape)
    finally:
        torch.set_num_threads(threads)


def latency_table(info: dict, batch: int) -> dict:
    """Every candidate block's latency on its teacher block's input shape at ``batch`` (``blocks``: one
    ``{candidate: ms}`` per block) and the head's (``head``: pooling + classifier on the last block's output),
    measured once per search: the summed table is the assembly's latency estimate."""
    import torch.nn as nn

    from kdray.algorithms import blockwise as bw
    from kdray.models.blockwise import candidate_block

    blocks = []
    for s in info["shapes"]:
        shape = bw.BlockShape(**s)
        blocks.append({n: cpu_latency_ms(candidate_block(**bw.with_interface(c, shape)), (batch, *shape.in_shape))
                       for n, c in zip(info["names"], info["choices"])})
    last = info["shapes"][-1]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(last["cout"], info["num_classes"]))
    return {"batch": batch, "blocks": blocks, "head": cpu_latency_ms(head, (batch, *last["out_shape"]))}


def check_latency(info: dict, spec: BlockSearchSpec, table: dict) -> None:
    """Both limits of ``spec.budget`` against the measured table, before any training (one ConfigError line)."""
    from kdray.algorithms import blockwise as bw

    try:
        bw.check_budget(info["params"], spec.params_budget, info["head_params"], table["blocks"],
                        spec.latency_budget_ms, table["head"])
    except bw.BudgetError as err:
        raise ConfigError(f"{err} (batch {table['batch']}, 1 CPU thread)") from None


@dataclass
class BlockTrialSetup:
    """What a block trial needs besides its (block, candidate); shipped once through the object store."""

    base: dict
    cuts: list[str]
    shapes: list[dict]
    teacher_path: str
    teacher_bytes: bytes = field(repr=False)
    results_dir: str
    epochs: int
    lr: float
    batch_size: int
    seed: int


def _teacher_features(setup: BlockTrialSetup, block: int):
    """The teacher's (input, output) of ``block`` on the train and validation images (eval mode)."""
    import torch

    from kdray.algorithms.blockwise import cut_teacher
    from kdray.models import create_model
    from kdray.orchestrator.build import build_splits

    cfg = load_config(setup.base)
    splits = build_splits(cfg)
    if not os.path.isfile(setup.teacher_path):  # a node that cannot see the driver's files
        os.makedirs(os.path.dirname(setup.teacher_path), exist_ok=True)
        tmp = f"{setup.teacher_path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(setup.teacher_bytes)
        os.replace(tmp, setup.teacher_path)
    from kdray.orchestrator.weights import load_weights, read_weights

    teacher = create_model(cfg.teacher.model, splits.num_classes, **cfg.teacher.args)
    load_weights(teacher, read_weights(setup.teacher_path, "teacher.checkpoint"), "teacher", splits.num_classes)
    teacher.eval()

    def images(ds):
        return torch.stack([ds[i][0] for i in range(len(ds))])

    xs_train, xs_val = images(splits.train), images(splits.val)
    blocks = cut_teacher(teacher, setup.cuts, xs_train[:2])
    return blocks.features(xs_train)[block], blocks.features(xs_val)[block]


def result_file(results_dir: str, block: int, name: str) -> str:
    return os.path.join(results_dir, f"block{block}-{name}.json")


def block_trial(config: dict, setup: BlockTrialSetup) -> None:
    """The Tune function of one (block, candidate) trial: train the candidate on the teacher's block, report
    the validation block loss per epoch; a stored result is reported again without training."""
    import torch
    from ray import tune

    from kdray.algorithms.blockwise import block_name, num_params, train_block, with_interface
    from kdray.algorithms.blockwise import BlockShape
    from kdray.models.blockwise import candidate_block

    i = int(config["block"])
    choice = {"width": int(config["width"]), "depth": int(config["depth"]), "kernel": int(config["kernel"])}
    name = block_name(choice)
    path = result_file(setup.results_dir, i, name)
    try:
        with open(path) as fh:
            tune.report(json.load(fh))
            return
    except (OSError, ValueError):
        pass
    torch.set_num_threads(1)
    start = time.time()
    block = with_interface(choice, BlockShape(**setup.shapes[i]))
    torch.manual_seed(setup.seed)
    module = candidate_block(**block)
    train, val = _teacher_features(setup, i)
    extra = {"block": i, "candidate": name, "params": num_params(module)}

    def on_epoch(epoch, loss):
        if epoch + 1 < setup.epochs:
            tune.report({"block_loss": loss, "epoch": epoch + 1, **extra})

    history = train_block(module, train, val, setup.epochs, setup.lr, setup.batch_size, setup.seed, on_epoch)
    os.makedirs(setup.results_dir, exist_ok=True)
    torch.save(module.state_dict(), path.removesuffix(".json") + ".pt.tmp")
    os.replace(path.removesuffix(".json") + ".pt.tmp", path.removesuffix(".json") + ".pt")
    final = {"block_loss": history[-1], "epoch": setup.epochs, "trial_epochs": setup.epochs,
             "start": start, "end": time.time(), "pid": os.getpid(), **extra}
    os.makedirs(setup.results_dir, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(final, fh)
    os.replace(tmp, path)
    tune.report(final)


def _run_tune(setup: BlockTrialSetup, spec: BlockSearchSpec, info: dict, sweep_dir: str, log):
    import optuna
    import ray
    from ray import tune

    from kdray.search.searcher import ResumableOptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    grid = {"block": list(range(len(spec.cuts))), "width": list(spec.widths), "depth": list(spec.depths),
            "kernel": list(spec.kernels)}
    total = math.prod(len(v) for v in grid.values())
    trainable = tune.with_resources(tune.with_parameters(block_trial, setup=setup), {"cpu": 1})
    path = os.path.join(sweep_dir, "tune")
    if tune.Tuner.can_restore(path):
        log(f"resuming Tune experiment {path}")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        concurrent = max(1, cpus) if spec.max_concurrent == "auto" else int(spec.max_concurrent)
        space = {k: optuna.distributions.CategoricalDistribution(v) for k, v in grid.items()}
        searcher = ResumableOptunaSearch(space, metric="block_loss", mode="min",
                                         sampler=optuna.samplers.GridSampler(grid, seed=spec.seed))
        log(f"Tune: {total} block trials ({len(spec.cuts)} blocks x {total // len(spec.cuts)} candidates, "
            f"Optuna grid), {min(concurrent, total)} at a time")
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=total,
                                        max_concurrent_trials=min(concurrent, total), reuse_actors=True),
            run_config=tune.RunConfig(name="tune", storage_path=sweep_dir, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=0)))
    results = fit_tuner(tuner, total, NAS_STOPPED)
    errors = [r.error for r in results if r.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} block trial(s) failed; first: {str(errors[0]).splitlines()[0]}")
    return results


def _score_table(setup: BlockTrialSetup, info: dict, spec: BlockSearchSpec):
    """Every (block, candidate) result from the result files (Tune's rows are a view of the same)."""
    import pandas as pd

    rows = []
    for i in range(len(spec.cuts)):
        for name in info["names"]:
            with open(result_file(setup.results_dir, i, name)) as fh:
                r = json.load(fh)
            rows.append({"block": i, "cut": spec.cuts[i], "candidate": name, "block_loss": float(r["block_loss"]),
                         "params": int(r["params"]), "trial_epochs": int(r["trial_epochs"]),
                         "start": float(r["start"]), "end": float(r["end"])})
    return pd.DataFrame(rows)


def _teacher_state(run_dir: str) -> dict:
    from kdray.orchestrator.run_dir import RunDir

    checkpoint = RunDir(run_dir, "").latest_checkpoint()
    teacher = checkpoint.state.weights.get("teacher") if checkpoint is not None else None
    if teacher is None:
        raise RuntimeError(f"no trained teacher in the base job's checkpoints under {run_dir}")
    return teacher


def _inherited_weights(setup: BlockTrialSetup, choice: list[str], blocks: list[dict], num_classes: int,
                       path: str) -> str:
    """The assembled student's initial ``state_dict``: each block as its trial trained it on the teacher's
    features, and the teacher's own tensors where name and shape match (the classifier ``fc``: the blocks end
    at the teacher's channel count, so the teacher's head fits). Written to ``path``; returns it."""
    import torch

    from kdray.models.blockwise import BlockwiseStudent

    student = BlockwiseStudent(blocks, num_classes)
    state = student.state_dict()
    for i, name in enumerate(choice):
        trained = torch.load(result_file(setup.results_dir, i, name).removesuffix(".json") + ".pt",
                             map_location="cpu", weights_only=True)
        state.update({f"blocks.{i}.{k}": v for k, v in trained.items()})
    from kdray.orchestrator.weights import read_weights, unwrap_state

    teacher = unwrap_state(read_weights(setup.teacher_path, "teacher.checkpoint"))
    state.update({k: v for k, v in teacher.items() if not k.startswith("blocks.") and k in state
                  and state[k].shape == v.shape})
    student.load_state_dict(state)
    torch.save(student.state_dict(), path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def _distilled(outcome, cfg: Config) -> dict:
    kind = get_scheme(cfg.scheme).searched_kind
    rows = [s for s in outcome.stages if s["kind"] == kind]
    return {"val_top1": statistics.mean(float(s["val_top1"]) for s in rows),
            "test_top1": statistics.mean(float(s["test_top1"]) for s in rows),
            "params": float(rows[0]["params"]), "epochs": cfg.train.epochs * len(rows),
            "mlflow_run_id": outcome.parent_run_id or ""}


def _quiet(_msg: str) -> None:
    pass


def run_block_search(name: str, output_dir: str | None, raw: dict, spec: BlockSearchSpec, resume: bool = False,
                     log=print) -> BlockSearchResult:
    import torch

    from kdray.algorithms import blockwise as bw
    from kdray.models.blockwise import BlockwiseStudent
    from kdray.orchestrator.api import distill
    from kdray.orchestrator.runtime import ensure_ray
    from kdray.orchestrator.tracking import flatten

    started = time.time()
    try:
        check_job_name(name)
    except ValueError as err:
        raise ConfigError(f"name: {err} (got {name!r})") from None
    base = nas_base_config(raw)
    sweep_dir = os.path.join(os.path.abspath(os.path.expanduser(output_dir or base.output_dir)), name)
    state_path = os.path.join(sweep_dir, STATE_FILE)
    if not resume and os.path.exists(state_path):
        raise ConfigError(f"block search {name!r} already has results in {sweep_dir}; pass --resume to finish "
                          f"it or choose another name")
    info = validate(base, spec)
    log(f"cuts {spec.cuts} checked: {len(info['names'])} candidates per block, smallest assembly "
        f"{bw.smallest_assembly(info['params'], info['head_params']):,} params"
        f"{'' if spec.params_budget is None else f', budget {spec.params_budget:,}'}")
    state = read_state(state_path) if resume else {}
    latency = None
    if spec.latency_budget_ms is not None:
        latency = state.get("latency") or latency_table(info, spec.latency_batch)
        check_latency(info, spec, latency)
        log(f"latency table at batch {spec.latency_batch}: fastest assembly "
            f"{bw.fastest_assembly(latency['blocks'], latency['head']):.4f} ms, budget {spec.latency_budget_ms:g} ms")
    os.makedirs(sweep_dir, exist_ok=True)
    if latency is not None and "latency" not in state:
        state["latency"] = latency  # measured once: a resumed search assembles with the same table
        write_state(state_path, state)
    ensure_ray(base.ray.address, num_cpus=1)
    params = flatten("blocks", spec.model_dump(mode="json"), {})
    params.update(flatten("base", {"teacher": base.teacher.model, "train": base.train.model_dump(mode="json"),
                                   "methods": [m.model_dump() for m in base.methods], "seeds": base.seeds}, {}))
    uri, tracking = open_tracking(base, sweep_dir, name, state, state_path, params,
                                  {"blocks.json": spec.model_dump_json(indent=2)}, resume, log, "block search")
    parent = tracking.parent_id if tracking else None
    job_raw = base.model_dump(mode="json")
    job_raw["mlflow"] = {**job_raw["mlflow"], "tracking_uri": uri, "enabled": uri is not None}
    try:
        # the teacher, trained once by the base job (which also distils the base student: the reference)
        if "base" not in state:
            braw = {**copy.deepcopy(job_raw), "name": "base", "output_dir": sweep_dir}
            bcfg = load_config(braw)
            log(f"base job: teacher {bcfg.teacher.model}, student {bcfg.student.model} {bcfg.student.args}")
            t0 = time.time()
            state["base"] = {**_distilled(distill(bcfg, resume=True, parent_run_id=parent, log=_quiet), bcfg),
                             "model": bcfg.student.model, "run_dir": bcfg.run_dir(), "wall_s": time.time() - t0}
            write_state(state_path, state)
        teacher_path = os.path.join(sweep_dir, "teacher.pt")
        if base.teacher.train is not None or base.teacher.mlflow_uri is not None:
            if not os.path.exists(teacher_path):
                weights = (_teacher_state(state["base"]["run_dir"]) if base.teacher.train is not None else
                           logged_teacher_state(base, info["num_classes"], uri))
                torch.save(weights, teacher_path + ".tmp")
                os.replace(teacher_path + ".tmp", teacher_path)
            job_raw["teacher"] = {"model": base.teacher.model, "args": base.teacher.args, "checkpoint": teacher_path}
        else:
            teacher_path = base.teacher.checkpoint
        with open(teacher_path, "rb") as fh:
            teacher_bytes = fh.read()
        setup = BlockTrialSetup(base=job_raw, cuts=list(spec.cuts), shapes=info["shapes"], teacher_path=teacher_path,
                                teacher_bytes=teacher_bytes, results_dir=os.path.join(sweep_dir, "blocks"),
                                epochs=spec.epochs, lr=spec.lr, batch_size=spec.batch_size, seed=spec.seed)
        t0 = time.time()
        _run_tune(setup, spec, info, sweep_dir, log)
        state.setdefault("trials_wall_s", time.time() - t0)  # a resumed search keeps the first measurement
        table = _score_table(setup, info, spec)
        scores = [{r.candidate: r.block_loss for r in table[table["block"] == i].itertuples()}
                  for i in range(len(spec.cuts))]
        limits = (spec.params_budget, info["head_params"], latency and latency["blocks"], spec.latency_budget_ms,
                  latency["head"] if latency else 0.0)
        chosen = bw.assemble(scores, info["params"], *limits)
        ranked = bw.all_assemblies(scores, info["params"], *limits)
        picks = [chosen] + _spread(ranked[1:], spec.compare)
        by_name = dict(zip(info["names"], info["choices"]))
        shapes = [bw.BlockShape(**s) for s in info["shapes"]]
        candidates = state.setdefault("candidates", {})
        for k, pick in enumerate(picks):
            key = "|".join(pick.choice)
            if key in candidates:
                continue
            blocks = [bw.with_interface(by_name[n], s) for n, s in zip(pick.choice, shapes)]
            job = "assembled" if k == 0 else f"assembly-{k}"
            args: dict = {"blocks": blocks}
            if spec.inherit:
                args["init"] = _inherited_weights(setup, pick.choice, blocks, info["num_classes"],
                                                  os.path.join(sweep_dir, f"{job}-init.pt"))
            craw = {**copy.deepcopy(job_raw), "name": job, "output_dir": sweep_dir,
                    "student": {"model": "blockwise_student", "args": args}}
            ccfg = load_config(craw)
            log(f"distilling {'the chosen assembly' if k == 0 else f'assembly {k}'} {' / '.join(pick.choice)} "
                f"({pick.params:,} params, summed block loss {pick.loss:.4f})")
            t0 = time.time()
            got = _distilled(distill(ccfg, resume=True, parent_run_id=parent, log=_quiet), ccfg)
            got["wall_s"] = time.time() - t0
            candidates[key] = {"choice": pick.choice, "block_loss": pick.loss, "params": pick.params,
                               "blocks": blocks, "args": args, "name": ccfg.name, **got}
            if latency is not None:  # the summed table's estimate beside the assembled whole, measured
                whole = BlockwiseStudent(blocks, info["num_classes"])
                candidates[key].update(latency_est_ms=pick.latency_ms, latency_ms=cpu_latency_ms(
                    whole, (spec.latency_batch, *info["shapes"][0]["in_shape"])))
            write_state(state_path, state)
        done = [candidates["|".join(p.choice)] for p in picks]
        assembled = done[0]
        rho = spearman([c["block_loss"] for c in done], [c["val_top1"] for c in done])
        cost = {"block_trial_epochs": int(table["trial_epochs"].sum()),
                "distill_epochs": int(assembled["epochs"]),
                "compare_epochs": int(sum(c["epochs"] for c in done[1:])),
                "base_s": float(state["base"].get("wall_s", 0.0)), "trials_s": float(state["trials_wall_s"]),
                "distill_s": float(assembled.get("wall_s", 0.0)),
                "compare_s": float(sum(c.get("wall_s", 0.0) for c in done[1:])),
                "wall_s": state.setdefault("wall_s", time.time() - started)}
        write_state(state_path, state)
        result = BlockSearchResult(
            table, {"choice": chosen.choice, "block_loss": chosen.loss, "params": chosen.params,
                    **({} if "latency_ms" not in assembled else {"latency_est_ms": chosen.latency_ms,
                                                   "latency_ms": assembled["latency_ms"]})},
            {"model": "blockwise_student", "args": assembled["args"]}, assembled, done, rho, cost,
            state["base"], sweep_dir, uri, parent)
        if tracking and not state.get("logged"):
            _log_outcome(tracking, result, spec)
            state["logged"] = True
            write_state(state_path, state)
        if tracking:
            tracking.finish()
        state["finished"] = True
        write_state(state_path, state)
        return result
    except BaseException as err:
        if tracking:
            tracking.fail(err)
        raise


def _spread(ranked: list, k: int) -> list:
    """``k`` assemblies evenly spaced over the ranking (best to worst), for the loss-vs-accuracy check."""
    if k <= 0 or not ranked:
        return []
    if k >= len(ranked):
        return list(ranked)
    step = (len(ranked) - 1) / max(1, k - 1) if k > 1 else 0
    idx = sorted({round(j * step) for j in range(k)}) if k > 1 else [len(ranked) - 1]
    return [ranked[i] for i in idx]


def loss_vs_accuracy(candidates: list[dict], rho: float | None, title: str):
    """Summed block loss against val top-1 of the distilled assemblies; the chosen one starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.scatter([c["block_loss"] for c in candidates], [c["val_top1"] for c in candidates], color="tab:blue",
               label="distilled assemblies")
    ax.scatter([candidates[0]["block_loss"]], [candidates[0]["val_top1"]], marker="*", s=200, color="gold",
               edgecolors="black", zorder=3, label="chosen (lowest loss within budget)")
    ax.set_xlabel("summed block loss (MSE / teacher variance)")
    ax.set_ylabel("val top-1 after end-to-end distillation")
    ax.set_title(f"{title}: block loss vs accuracy" + ("" if rho is None else f" (Spearman {rho:.2f})"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _log_outcome(tracking, result: BlockSearchResult, spec: BlockSearchSpec) -> None:
    from kdray.search import plots

    metrics: dict[str, float] = {}
    for r in result.scores.itertuples():
        metrics[f"block{r.block}.{r.candidate}.loss"] = r.block_loss
    a = result.assembled
    metrics.update(assembled_val_top1=a["val_top1"], assembled_test_top1=a["test_top1"],
                   assembled_params=a["params"], assembled_block_loss=result.chosen["block_loss"],
                   base_val_top1=result.base["val_top1"], base_test_top1=result.base["test_top1"],
                   block_trial_epochs=result.cost["block_trial_epochs"], wall_s=result.cost["wall_s"],
                   n_block_trials=len(result.scores))
    if result.spearman is not None:
        metrics["spearman_block_loss_val_top1"] = result.spearman
    if "latency_ms" in result.chosen:  # measured on the assembled student vs the summed block table
        metrics.update(assembled_latency_ms=result.chosen["latency_ms"],
                       assembled_latency_est_ms=result.chosen["latency_est_ms"])
    params = {f"chosen.block{i}": f"{spec.cuts[i]}:{n}" for i, n in enumerate(result.chosen["choice"])}
    params["chosen.params"] = str(result.chosen["params"])
    if "latency_ms" in result.chosen:
        params["chosen.latency_ms"] = f"{result.chosen['latency_ms']:.4f} measured, " \
                                      f"{result.chosen['latency_est_ms']:.4f} summed (batch {spec.latency_batch})"
    texts = {"block_scores.csv": result.scores.to_csv(index=False), "summary.md": result.summary(),
             "architecture.json": json.dumps({"student": result.student, "choice": result.chosen["choice"],
                                              "cuts": spec.cuts, "budget": spec.budget}, indent=2),
             "assemblies.json": json.dumps(result.candidates, indent=2)}
    figures = {"block_loss_vs_accuracy.png": loss_vs_accuracy(result.candidates, result.spearman,
                                                              os.path.basename(result.path))}
    tracking.log_outcome(metrics, params, texts, figures)
    for fig in figures.values():
        plots.close(fig)


# --- command line --------------------------------------------------------------------------------
def _cmd_nas(args) -> int:
    result = nas_file(args.config, overrides=args.overrides, resume=args.resume)
    print(result.summary())
    print(f"\nAssembled student: {json.dumps(result.student)}")
    if result.tracking_uri:
        print(f"MLflow: {result.tracking_uri}  (block search run {result.parent_run_id})")
    print(f"Search directory: {result.path}")
    return 0


def add_parser(subparsers) -> None:
    """Add ``nas`` to ``kdray``'s sub-commands."""
    p = subparsers.add_parser("nas", help="block-wise NAS-guided distillation (DNA): search student blocks on "
                                          "the teacher's blocks, assemble under a budget, distil")
    p.add_argument("config", help="NAS YAML (name:, base:, blocks: {cuts, widths, depths, kernels, budget})")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides of the NAS file, e.g. blocks.budget=5000")
    p.add_argument("--resume", action="store_true", help="finish an interrupted block search")
    p.set_defaults(func=_cmd_nas)
