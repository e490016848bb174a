"""``kdray.sweep``: validate a space against a base job, train the teacher once, run the Tune trials,
re-evaluate ASHA-stopped Pareto candidates at full budget, and track it all under one MLflow run.

Layout of a sweep directory (``<output_dir>/<name>``)::

    sweep.json        the parent run id, the base result, re-evaluations, what has been logged
    base/             the base configuration's job (trains the teacher; the reference accuracy)
    teacher.pt        the teacher's state_dict, used by every trial (``teacher.checkpoint``)
    tune/             Tune's experiment (``Tuner.restore`` resumes it)
    trials/trial-<id> each trial's job: checkpoints, ``mlflow_runs.json``, ``trial_result.json``
"""
from __future__ import annotations

import copy
import json
import math
import os
import statistics
import warnings
from dataclasses import dataclass, field
from typing import Any

from kdray.config import Config, ConfigError, check_job_name, load_config
from kdray.orchestrator.plan import get_scheme, list_schemes
from kdray.orchestrator.runtime import ensure_ray
from kdray.search.space import CallableSpace, Space, apply_params, make_space
from kdray.search.spec import SearchSpec, auto_grace, base_raw, load_sweep_spec
from kdray.search.tracking import read_state, write_state
from kdray.search.tuning import fit_tuner, open_tracking
from kdray.search.trial import RESULT_FILE, TrialSetup, continue_job, job_run_id, mark_early_stopped, run_trial, \
    trial_name

STATE_FILE = "sweep.json"
SWEEP_STOPPED = ("Ctrl-C: Tune stopped the sweep with {ended} of {total} trials ended; "
                 "`kdray sweep FILE --resume` (or resume=True) continues it")


@dataclass
class SweepResult:
    """What a sweep found. ``trials`` has one row per Tune trial; ``pareto`` the non-dominated full-budget
    trials; ``best_config`` is a complete job config (``kdray run`` accepts it as YAML)."""

    best_config: dict | None
    best_params: dict
    best: dict | None
    pareto: Any  # pandas.DataFrame
    trials: Any  # pandas.DataFrame
    base: dict
    objectives: list[str]
    path: str
    tracking_uri: str | None = None
    parent_run_id: str | None = None
    registered: dict | None = None
    notes: list[str] = field(default_factory=list)
    #: the smallest full-budget student at least as accurate (val top-1) as the base, with fewer parameters
    smaller: dict | None = None

    def summary(self) -> str:
        rows = ["| | val top-1 | test top-1 | params | trial |", "|---|---|---|---|---|"]
        b = self.base
        rows.append(f"| base config | {b['val_top1']:.4f} | {b['test_top1']:.4f} | {int(b['params']):,} | |")
        if self.best:
            s = self.best
            rows.append(f"| **best trial** | {s['val_top1']:.4f} | {_fmt(s.get('test_top1'))} | "
                        f"{int(s['params']):,} | {s['name']} |")
        if self.smaller:
            s = self.smaller
            rows.append(f"| smallest trial >= base | {s['val_top1']:.4f} | {_fmt(s.get('test_top1'))} | "
                        f"{int(s['params']):,} | {s['name']} |")
        metrics = [o.split(":")[0] for o in self.objectives]
        lines = ["\n".join(rows), ""]
        if len(self.pareto) and len(self.objectives) > 1:
            cols = ["name", *metrics, "test_top1", "student.model"]
            cols = [c for c in cols if c in self.pareto.columns]
            lines.append(f"Pareto set ({', '.join(self.objectives)}): {len(self.pareto)} trial(s)")
            lines.append(_markdown(self.pareto[cols]))
        t = self.trials
        if len(t):
            lines.append("")
            dup = int((t["status"] == "duplicate").sum())
            lines.append(f"{len(t)} trials: {int(t['full_budget'].sum()) - dup} at full budget "
                         f"({int((t['status'] == 'reevaluated').sum())} re-evaluated), "
                         f"{int((t['status'] == 'early_stopped').sum())} stopped by ASHA"
                         + (f", {dup} repeated an earlier configuration" if dup else "")
                         + f"; {int(t['trial_epochs'].sum())} trial-epochs")
        return "\n".join(lines)


def _fmt(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _markdown(df) -> str:
    cols = list(df.columns)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            cells.append(f"{v:.4f}" if isinstance(v, float) and not float(v).is_integer() else
                         (f"{int(v):,}" if isinstance(v, float) else str(v)))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


# --- public entry points -------------------------------------------------------------------------
def sweep(space, base_config, *, num_samples: int | None = 20, objectives=None, sampler: str | None = None,
          asha: dict | None | bool = True, seeds=None, name: str = "kdray-sweep", output_dir: str | None = None,
          resume: bool = False, log=print, **search) -> SweepResult:
    """Search student architecture and distillation hyper-parameters with Ray Tune + Optuna.

    ``space``: a mapping in the sweep-file form (see :mod:`kdray.search.space`) or an Optuna define-by-run
    function ``fn(trial) -> dict | None`` suggesting config paths. ``base_config``: a job config (file,
    packaged example, dict, :class:`~kdray.config.Config`). ``objectives``: e.g.
    ``["val_top1:max", "params:min"]``; ``sampler``: ``tpe`` (default), ``nsga2``, ``random`` or ``grid``;
    ``asha``: ``True`` (defaults), a dict (``grace_period``, ``max_t``, ``reduction_factor``) or
    ``False``/``None``; ``seeds``: seeds per configuration (a list or a count); further keyword arguments
    are :class:`~kdray.search.spec.SearchSpec` fields (``max_concurrent``, ``workers_per_trial``,
    ``reevaluate``, ``register_model``, ``model_name``, ``verbose``, ...). Returns a :class:`SweepResult`.
    """
    from pydantic import ValidationError

    from kdray.config import format_error

    fields: dict[str, Any] = dict(search)
    if num_samples is not None or sampler == "grid":
        fields["num_samples"] = num_samples
    if objectives is not None:
        fields["objectives"] = objectives
    if sampler is not None:
        fields["sampler"] = sampler
    if asha is not True:
        fields["asha"] = asha or None
    if seeds is not None:
        fields["seeds"] = seeds
    try:
        spec = SearchSpec.model_validate(fields)
    except ValidationError as err:
        raise ConfigError("search." + format_error(err)) from None
    try:
        check_job_name(name)
    except ValueError as err:
        raise ConfigError(f"name: {err} (got {name!r})") from None
    if isinstance(base_config, Config):
        raw = base_config.model_dump(mode="json")
    else:
        raw = base_raw(base_config)
    texts = {"space.json": json.dumps(space, indent=2, default=str) if isinstance(space, dict) else repr(space)}
    return run_sweep(name, output_dir, raw, make_space(space), spec, resume=resume, log=log, texts=texts)


def sweep_file(source: str | dict, overrides: list[str] | None = None, resume: bool = False,
               log=print) -> SweepResult:
    """Run the sweep described by a sweep YAML (``kdray sweep CONFIG.yaml``)."""
    spec, where = load_sweep_spec(source, overrides)
    raw = base_raw(spec.base, where)
    import yaml

    texts = {"sweep.yaml": yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)}
    return run_sweep(spec.name, spec.output_dir, raw, make_space(spec.space), spec.search, resume=resume, log=log,
                     texts=texts)


# --- the sweep -----------------------------------------------------------------------------------
def _checkpoint_every(search: SearchSpec, info: dict, base_every: int) -> int:
    """In-process trials checkpoint (and flush their epoch metrics to MLflow) at every epoch where ASHA
    can stop them: multiples of the grace period when the reduction factor is whole, else every epoch.
    A stopped trial then holds its state at the stop, and re-evaluation continues from there."""
    if search.asha is None:
        return base_every
    rf = search.asha.reduction_factor
    return info["grace"] if float(rf).is_integer() else 1


def _base_config(raw: dict, search: SearchSpec) -> Config:
    """The base job as every trial sees it: the search's seeds, no from-scratch baseline, the placement."""
    raw = copy.deepcopy(raw)
    if search.seeds is not None:
        raw["seeds"] = list(search.seeds)
    raw["baseline"] = False
    try:
        settings = get_scheme(raw.get("scheme", "offline")).search_settings
    except ValueError:
        settings = {}  # an unknown scheme: load_config below says so in one line
    for section, values in settings.items():
        raw[section] = {**(raw.get(section) or {}), **values}
    raw.setdefault("ray", {})
    raw["ray"] = {**(raw["ray"] or {}), "num_workers": search.workers_per_trial}
    try:
        return load_config(raw)
    except ConfigError as err:
        raise ConfigError(f"base: {err}") from None


def _quiet(_msg: str) -> None:
    pass


def _method_warmup(methods: list) -> int:
    longest = 0
    for m in methods or []:
        if isinstance(m, dict):
            for key in ("warmup", "hint_epochs"):
                if isinstance(m.get(key), (int, float)):
                    longest = max(longest, int(m[key]))
    return longest


def _schedule(space, base: Config, search: SearchSpec) -> tuple[int, int, int]:
    """(max epochs a trial trains, ASHA max_t, ASHA grace period)."""
    searched = space.max_value("train.epochs")
    max_epochs = int(searched) if searched is not None else base.train.epochs
    if search.asha is None:
        return max_epochs, max_epochs, 0
    max_t = max_epochs if search.asha.max_t == "auto" else int(search.asha.max_t)
    if max_t < max_epochs:
        raise ConfigError(f"search.asha.max_t: {max_t} is below the {max_epochs} epochs a trial can train; "
                          f"ASHA would stop every trial before its end")
    warmup = _method_warmup([m.model_dump() for m in base.methods])
    for key, value in space.constant_values():
        if key.endswith((".warmup", ".hint_epochs")) and isinstance(value, (int, float)):
            warmup = max(warmup, int(value))
        elif key == "methods" and isinstance(value, list):
            warmup = max(warmup, _method_warmup(value))
    grace = (auto_grace(max_t, search.asha.reduction_factor, warmup) if search.asha.grace_period == "auto"
             else int(search.asha.grace_period))
    if grace > max_t:
        raise ConfigError(f"search.asha.grace_period: {grace} exceeds max_t {max_t}")
    return max_epochs, max_t, grace


def _check_build(cfg: Config, splits, example, teacher_model, cache: dict) -> None:
    """The scheme's own preflight of a sampled config: the student, its knowledge terms and connectors built
    against the teacher, the scheme's own checks (generator shapes, feature points, modalities); no training."""
    from kdray.orchestrator.build import create_spec_model

    scheme = get_scheme(cfg.scheme)
    sections = {name: getattr(cfg, name) for name in scheme.sections if name not in ("teacher", "teachers")}
    key = json.dumps([cfg.student.model, cfg.student.args, [m.model_dump() for m in cfg.methods],
                      {k: v.model_dump(mode="json") if hasattr(v, "model_dump") else v for k, v in sections.items()}],
                     sort_keys=True, default=str)
    if key in cache:
        return
    student = create_spec_model(cfg.student, "student", splits.num_classes)
    teachers = [] if teacher_model is None else [teacher_model]
    scheme.preflight(cfg, splits, example, student, teachers, [None] * len(teachers))
    cache[key] = True


def validate(space, base: Config, search: SearchSpec) -> dict:
    """Everything checkable before a trial starts; each failure is a one-line :class:`ConfigError`.
    Returns facts the sweep needs (class count, input shape, Optuna distributions, ASHA schedule)."""
    from kdray.models import create_model
    from kdray.orchestrator.api import preflight
    from kdray.orchestrator.build import build_splits, example_batch

    swept = [name for name, scheme in list_schemes().items() if scheme.searched_kind]
    scheme = get_scheme(base.scheme)
    if scheme.searched_kind is None or (base.teacher is None and "teacher" in scheme.sections):
        raise ConfigError(f"base: a sweep distils from one teacher (teacher: with scheme {' | '.join(swept)}), "
                          f"got scheme {base.scheme!r}{'' if base.teacher is not None else ' without teacher:'}")
    preflight(base)
    splits = build_splits(base)
    if len(splits.val) == 0:
        raise ConfigError("data: a sweep optimises val_top1 but the validation split is empty; "
                          "set data.options.val_fraction > 0")
    example = example_batch(splits.train)
    # the teacher's architecture is what the build checks need (preflight above loaded its weights)
    teacher_model = (None if base.teacher is None else  # a scheme without a teacher (lifelong): no build check
                     create_model(base.teacher.model, splits.num_classes, **base.teacher.args))
    if isinstance(space, CallableSpace):
        configs, distributions = space.probe()
    else:
        configs, distributions = space.check_configs(), space.distributions()
    raw = base.model_dump(mode="json")
    cache: dict = {}
    built = []
    for step in ("config", "build"):  # every config is valid before any model is built
        for i, (desc, sampled) in enumerate(configs):
            try:
                if step == "config":
                    built.append(load_config(apply_params(raw, space.resolve(sampled))))
                else:
                    _check_build(built[i], splits, example, teacher_model, cache)
            except ConfigError as err:
                raise ConfigError(f"space ({desc}): {err}") from None
            except (ValueError, TypeError, RuntimeError, KeyError, IndexError) as err:
                first = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise ConfigError(f"space ({desc}): {first}") from None
    if search.sampler == "grid":
        if isinstance(space, CallableSpace):
            raise ConfigError("search.sampler: grid needs a space mapping, not a function")
        space.grid()
    max_epochs, max_t, grace = _schedule(space, base, search)
    student_example = get_scheme(base.scheme).model_inputs(base, "student", example)  # its modality, if several
    input_shape = tuple(student_example.shape[1:]) if hasattr(student_example, "shape") else None  # text: a mapping
    if input_shape is None and "latency_ms" in search.metrics:
        raise ConfigError("search.objectives: latency_ms times the student on one input tensor, but this job's "
                          "inputs are a mapping (text); drop latency_ms")
    return {"num_classes": splits.num_classes, "input_shape": input_shape,
            "distributions": distributions, "max_epochs": max_epochs, "max_t": max_t, "grace": grace,
            "checked": len(configs)}


def _ensure_ray(base: Config, search: SearchSpec) -> None:
    """Ray for the sweep: a local one gets at least one trial's CPUs (a trial may ask for more than the cores)."""
    ensure_ray(base.ray.address, num_cpus=math.ceil(_per_trial_cpus(base, search)))


def _per_trial_cpus(base: Config, search: SearchSpec) -> float:
    if search.workers_per_trial:
        return 1 + search.workers_per_trial * base.ray.cpus_per_worker
    return search.cpus_per_trial


def _sampler(search: SearchSpec, space, num_samples: int):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if search.sampler == "nsga2":
            population = search.population_size or max(4, num_samples // 4)
            from kdray.search.searcher import PicklableNSGAIISampler

            return PicklableNSGAIISampler(population_size=population, seed=search.seed)
        if search.sampler == "random":
            return optuna.samplers.RandomSampler(seed=search.seed)
        if search.sampler == "grid":
            return optuna.samplers.GridSampler(space.grid(), seed=search.seed)
        startup = search.n_startup_trials or max(2, min(10, num_samples // 3))
        return optuna.samplers.TPESampler(seed=search.seed, n_startup_trials=startup, multivariate=True,
                                          group=True, constant_liar=True)


_LOG = [print]  # where trial progress lines go (a module global: Tune pickles its callbacks)


def _log_line(msg: str) -> None:
    _LOG[0](msg)


def _progress_callback(total: int):
    """One line per finished trial (Tune's own tables: ``search.verbose: 1``)."""
    from ray import tune

    log = _log_line

    class TrialProgress(tune.Callback):
        def __init__(self):
            self.done = 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            r = trial.last_result or {}
            if "val_top1" not in r:
                return
            how = ("full budget" if r.get("full_budget") else f"stopped by ASHA at epoch {r.get('epoch')}")
            if r.get("duplicate_of"):
                how = f"same configuration as {r['duplicate_of']}, not trained again"
            log(f"[{self.done}/{total}] {trial_name(trial)}: val top-1 {r['val_top1']:.4f}, "
                f"{int(r.get('params', 0)):,} params, {how}")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.done += 1
            log(f"[{self.done}/{total}] {trial_name(trial)}: error (see {trial.path})")

    return TrialProgress()


def _run_tune(setup: TrialSetup, space, search: SearchSpec, sweep_dir: str, info: dict, base: Config, log):
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from kdray.search.searcher import ResumableOptunaSearch

    _LOG[0] = log
    per_trial = _per_trial_cpus(base, search)
    resources = {"cpu": 1} if search.workers_per_trial else {"cpu": search.cpus_per_trial}
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), resources)
    path = os.path.join(sweep_dir, "tune")
    repair_tune_state(path, log)
    num_samples = search.num_samples
    if search.sampler == "grid":
        size = math.prod(len(v) for v in space.grid().values())
        num_samples = size if num_samples is None else min(num_samples, size)
    if num_samples is None:
        raise ConfigError("search.num_samples: give a number of trials")
    if tune.Tuner.can_restore(path):
        log(f"resuming Tune experiment {path}")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False)
        return fit_tuner(tuner, num_samples, SWEEP_STOPPED)
    cpus = ray.cluster_resources().get("CPU", 1)
    concurrent = (max(1, int(cpus // per_trial)) if search.max_concurrent == "auto"
                  else int(search.max_concurrent))
    concurrent = min(concurrent, num_samples)
    metrics, modes = search.metrics, search.modes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        searcher = ResumableOptunaSearch(space, metric=metrics if len(metrics) > 1 else metrics[0],
                                         mode=modes if len(modes) > 1 else modes[0],
                                         sampler=_sampler(search, space, num_samples))
    scheduler = None
    if search.asha is not None:
        scheduler = ASHAScheduler(time_attr="epoch", metric="val_top1", mode="max", max_t=info["max_t"],
                                  grace_period=info["grace"], reduction_factor=search.asha.reduction_factor)
    log(f"Tune: {num_samples} trials, {search.sampler} sampler"
        f"{', ASHA grace %d max_t %d' % (info['grace'], info['max_t']) if scheduler else ''}, "
        f"{concurrent} at a time, "
        f"{'%d Train workers each' % search.workers_per_trial if search.workers_per_trial else 'in-process'}")
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=num_samples,
                                    max_concurrent_trials=concurrent, trial_name_creator=trial_name,
                                    trial_dirname_creator=trial_name,
                                    reuse_actors=search.workers_per_trial == 0),
        run_config=tune.RunConfig(name="tune", storage_path=sweep_dir, verbose=search.verbose,
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  callbacks=[_progress_callback(num_samples)]),
    )
    return fit_tuner(tuner, num_samples, SWEEP_STOPPED)


def is_complete_pickle(path: str) -> bool:
    """Whether ``path`` holds a whole pickle stream, judged by walking its opcodes to ``STOP``
    (``pickletools.genops``) without executing any: loading a pickle to test it would run its code."""
    import pickletools

    try:
        with open(path, "rb") as fh:
            return any(op.name == "STOP" for op, _, _ in pickletools.genops(fh))
    except Exception:  # noqa: BLE001  (cut short inside an opcode, an unknown opcode, unreadable)
        return False


def _is_complete_json(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            json.load(fh)
        return True
    except Exception:  # noqa: BLE001  (truncated, empty, undecodable)
        return False


#: Tune's state files in an experiment directory and how each is written (``search_gen_state`` is a
#: cloudpickle despite its name). Tune restores each kind from the file whose name sorts last.
_TUNE_STATE = {"experiment_state-*.json": _is_complete_json, "search_gen_state-*.json": is_complete_pickle,
               "searcher-state-*.pkl": is_complete_pickle, "callback-states-*.pkl": is_complete_pickle,
               "tuner.pkl": is_complete_pickle}


def repair_tune_state(path: str, log=print) -> list[str]:
    """Tune copies its state into the sweep's ``tune/`` directory in place (not atomically): a driver killed
    during a copy leaves a file cut short that ``Tuner.restore`` cannot read. Such a file is set aside
    (``*.unreadable``), so that Tune restores that kind from the newest intact file left, the state of an
    earlier driver session (each session writes its own ``*-<session time>`` files). Nothing is taken from
    outside the sweep's directory: Ray's session directories are world-writable, and a pickle found there
    would run its code. Nothing is unpickled either (see :func:`is_complete_pickle`). When no intact file
    of a kind is left, Tune would fail with a traceback or start its searcher afresh: ``ConfigError``.
    Returns the files set aside."""
    import glob

    changed = []
    if not os.path.isdir(path):
        return changed
    for pattern, complete in _TUNE_STATE.items():
        files = sorted(glob.glob(os.path.join(path, pattern)))
        broken = [f for f in files if not complete(f)]
        if broken and len(broken) == len(files):
            raise ConfigError(f"Tune state: {broken[-1]} was cut short when the sweep was interrupted and "
                              f"{path} holds no intact copy; move {path} aside and rerun with --resume to run "
                              f"the trials afresh (the base job and teacher are kept)")
        for file in broken:
            os.replace(file, file + ".unreadable")
            log(f"Tune state: {os.path.basename(file)} was cut short by the interruption; set aside, Tune "
                f"restores from the earlier copy in {path}")
            changed.append(file)
    return changed


def _trial_rows(results, setup: TrialSetup, space, search: SearchSpec, info: dict):
    import pandas as pd

    rows = []
    for result in results:
        metrics = dict(result.metrics or {})
        config = dict(result.config or {})
        trial_id = metrics.get("trial_id") or os.path.basename(str(result.path)).removeprefix("trial-")
        name = trial_name(trial_id)
        run_dir = os.path.join(setup.trials_dir, name)
        stored = None
        if os.path.exists(os.path.join(run_dir, RESULT_FILE)):
            with open(os.path.join(run_dir, RESULT_FILE)) as fh:
                stored = json.load(fh)
        if stored:
            metrics = {**metrics, **stored}
        full = bool(metrics.get("full_budget", 0))
        diverged = bool(metrics.get("diverged", 0))
        if result.error is not None and not full:
            status = "error"
        elif diverged:
            status = "diverged"
        elif full and metrics.get("duplicate_of"):
            status = "duplicate"
        elif full:
            status = "complete"
        elif "val_top1" in metrics:
            status = "early_stopped"
        else:
            status = "error"
        row = {"trial_id": trial_id, "name": name, "status": status,
               "val_top1": float(metrics.get("val_top1", float("nan"))),
               "val_top1_std": float(metrics.get("val_top1_std", float("nan"))),
               "test_top1": float(metrics.get("test_top1", float("nan"))),
               "params": float(metrics.get("params", float("nan"))),
               "epoch": int(metrics.get("epoch", 0) or 0), "epochs": int(metrics.get("epochs", 0) or 0),
               "trial_epochs": int(metrics.get("trial_epochs", 0) or 0),
               "full_budget": full and not diverged, "diverged": diverged,
               "best_stage": metrics.get("best_stage"), "run_id": job_run_id(run_dir) or "",
               "duplicate_of": metrics.get("duplicate_of") or "",
               "error": (str(result.error).splitlines()[0][:300] if result.error is not None else
                         metrics.get("error", "")),
               "optuna_params": config, "run_dir": run_dir}
        if "latency_ms" in search.metrics:
            row["latency_ms"] = float(metrics.get("latency_ms", float("nan")))
        try:
            for path, value in setup.params(config):
                row[path] = value
        except (KeyError, ValueError):
            pass
        rows.append(row)
    df = pd.DataFrame(rows)
    if len(df):
        df = df.sort_values("trial_id").reset_index(drop=True)
    return df


def _point(row, metrics) -> list[float]:
    return [float(row[m]) for m in metrics]


def _eligible(df):
    """Trials that count for the best trial and the Pareto set: full budget, not diverged, not repeats of
    another trial's configuration."""
    return df[df["full_budget"] & ~df["diverged"] & df["status"].isin(["complete", "reevaluated"])]


def _reevaluate(df, setup: TrialSetup, search: SearchSpec, state: dict, state_path: str, log, every: int):
    """Continue ASHA-stopped trials that no full-budget trial dominates to the full budget (their own job,
    from its last checkpoint, into its own MLflow runs); they may then join the Pareto set."""
    from kdray.search.pareto import dominated_by_any

    if not search.multi_objective or search.reevaluate == 0 or not len(df):
        return df
    metrics, modes = search.metrics, search.modes
    full_points = [_point(r, metrics) for _, r in _eligible(df).iterrows()]
    stopped = df[(df["status"] == "early_stopped")]
    candidates = [r for _, r in stopped.iterrows() if not dominated_by_any(_point(r, metrics), full_points, modes)]
    candidates.sort(key=lambda r: -r["val_top1"])
    done = state.setdefault("reevaluated", {})
    skipped = candidates[search.reevaluate:]
    if skipped:
        log(f"re-evaluation: {len(skipped)} more stopped candidate(s) left out (search.reevaluate="
            f"{search.reevaluate})")
    todo = [r for r in candidates[: search.reevaluate] if r["trial_id"] not in done]
    jobs = {}
    for row in todo:
        job = setup.job_config(row["optuna_params"], row["name"])
        job["checkpoint"]["every_epochs"] = every  # the base's: nothing will stop it now
        extra = {"params": row["params"], **({"latency_ms": row["latency_ms"]} if "latency_ms" in row else {})}
        jobs[row["trial_id"]] = (job, extra, row)
    if jobs:
        log(f"re-evaluating {len(jobs)} ASHA-stopped Pareto candidate(s) at full budget "
            f"({', '.join(r['name'] for _, _, r in jobs.values())})")
    if jobs and setup.workers == 0:  # in-process trials: re-evaluate them side by side as Ray tasks
        import ray

        task = ray.remote(continue_job).options(num_cpus=setup.cpus_per_trial, max_retries=0)
        refs = {task.remote(job, setup.parent_run_id, extra, setup.cpus_per_trial): tid
                for tid, (job, extra, _) in jobs.items()}
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            tid = refs.pop(ready[0])
            done[tid] = _with_epochs(ray.get(ready[0]), jobs[tid])
            write_state(state_path, state)
    else:
        for tid, (job, extra, row) in jobs.items():
            done[tid] = _with_epochs(continue_job(job, setup.parent_run_id, extra, 0), jobs[tid])
            write_state(state_path, state)
    for row in candidates[: search.reevaluate]:
        final = done[row["trial_id"]]
        i = df.index[df["trial_id"] == row["trial_id"]][0]
        for key in ("val_top1", "val_top1_std", "test_top1", "trial_epochs", "best_stage"):
            if key in final:
                df.at[i, key] = final[key]
        df.at[i, "epoch"] = df.at[i, "epochs"]
        df.at[i, "diverged"] = bool(final.get("diverged", 0))
        df.at[i, "full_budget"] = not bool(final.get("diverged", 0))
        df.at[i, "status"] = "diverged" if final.get("diverged") else "reevaluated"
    return df


def _with_epochs(final: dict, item) -> dict:
    """Trial-epochs of a re-evaluated trial: what Tune ran plus the epochs it took to finish."""
    job, _, row = item
    cfg = load_config(job)
    total = cfg.train.epochs * len(cfg.seeds)
    final["trial_epochs"] = int(row["trial_epochs"]) + max(0, total - int(row["epoch"]))
    return final


def _select(df, search: SearchSpec):
    from kdray.search.pareto import pareto_mask

    df["pareto"] = False
    ok = _eligible(df)
    if not len(ok):
        return df, None
    mask = pareto_mask([_point(r, search.metrics) for _, r in ok.iterrows()], search.modes)
    df.loc[ok.index[mask], "pareto"] = True
    best_idx = ok.sort_values(["val_top1", "params"], ascending=[False, True]).index[0]
    return df, best_idx


def _smaller(df, base: dict) -> dict | None:
    ok = _eligible(df) if len(df) else df
    if not len(ok):
        return None
    wins = ok[(ok["val_top1"] >= base["val_top1"]) & (ok["params"] < base["params"])]
    if not len(wins):
        return None
    return wins.sort_values(["params", "val_top1"], ascending=[True, False]).iloc[0].to_dict()


def _run_base(base: Config, sweep_dir: str, parent: str | None, uri: str | None, log,
              workers: int | None = None) -> dict:
    """The base configuration as a job (teacher stage + distilled students on the sweep's seeds)."""
    from kdray.orchestrator.api import distill

    raw = base.model_dump(mode="json")
    raw.update(name="base", output_dir=sweep_dir)
    if workers is not None:
        raw["ray"] = {**raw["ray"], "num_workers": workers}
    raw["mlflow"] = {**raw["mlflow"], "tracking_uri": uri, "enabled": uri is not None}
    cfg = load_config(raw)
    log(f"base configuration: {cfg.student.model} {cfg.student.args} with {'+'.join(m.name for m in cfg.methods)}"
        f", seeds {cfg.seeds}{' (training the teacher)' if cfg.teacher and cfg.teacher.train else ''}")
    outcome = distill(cfg, resume=True, parent_run_id=parent, log=_quiet)
    kind = get_scheme(cfg.scheme).searched_kind_for(cfg)
    distilled = [s for s in outcome.stages if s["kind"] == kind]
    return {"val_top1": statistics.mean(s["val_top1"] for s in distilled),
            "test_top1": statistics.mean(s["test_top1"] for s in distilled),
            "params": float(distilled[0]["params"]), "seeds": len(distilled), "run_dir": cfg.run_dir(),
            "mlflow_run_id": outcome.parent_run_id, "model": cfg.student.model, "args": cfg.student.args}


def _teacher_state(run_dir: str) -> dict:
    """The trained teacher's weights from the base job's newest checkpoint (in-process or Ray Train)."""
    from kdray.orchestrator.run_dir import RunDir

    checkpoint = RunDir(run_dir, "").latest_checkpoint()
    teacher = checkpoint.state.weights.get("teacher") if checkpoint is not None else None
    if teacher is None:
        raise RuntimeError(f"no trained teacher in the base job's checkpoints under {run_dir}")
    return teacher


def run_sweep(name: str, output_dir: str | None, raw: dict, space: Space | CallableSpace, search: SearchSpec,
              resume: bool = False, log=print, texts: dict | None = None) -> SweepResult:
    import torch

    base = _base_config(raw, search)
    sweep_dir = os.path.join(os.path.abspath(os.path.expanduser(output_dir or base.output_dir)), name)
    state_path = os.path.join(sweep_dir, STATE_FILE)
    if not resume and (os.path.exists(state_path) or os.path.isdir(os.path.join(sweep_dir, "tune"))):
        raise ConfigError(f"sweep {name!r} already has results in {sweep_dir}; pass --resume to finish it "
                          f"or choose another name")
    info = validate(space, base, search)
    log(f"space checked: {info['checked']} option combinations build")
    state = read_state(state_path) if resume else {}
    os.makedirs(sweep_dir, exist_ok=True)
    _ensure_ray(base, search)
    from kdray.orchestrator.tracking import flatten

    params = flatten("search", search.model_dump(mode="json"), {})
    params.update(flatten("base", {"student": base.student.model_dump(mode="json"),
                                   "teacher": base.teacher.model if base.teacher else None, "train": base.train.model_dump(mode="json"),
                                   "methods": [m.model_dump() for m in base.methods], "seeds": base.seeds}, {}))
    uri, tracking = open_tracking(base, sweep_dir, name, state, state_path, params, texts or {}, resume, log)
    parent = tracking.parent_id if tracking else None
    try:
        if "base" not in state:
            state["base"] = _run_base(base, sweep_dir, parent, uri, log, search.base_workers)
            write_state(state_path, state)
        base_result = state["base"]
        log(f"base: val top-1 {base_result['val_top1']:.4f}, test top-1 {base_result['test_top1']:.4f}, "
            f"{int(base_result['params']):,} params")
        trial_raw = base.model_dump(mode="json")
        # trials run in Tune's per-trial working directories: give them the resolved (absolute) store
        trial_raw["mlflow"] = {**trial_raw["mlflow"], "tracking_uri": uri, "enabled": uri is not None}
        teacher_bytes = None
        teacher_path = None
        if base.teacher is not None and base.teacher.train is not None:
            teacher_path = os.path.join(sweep_dir, "teacher.pt")
            if not os.path.exists(teacher_path):
                tmp = teacher_path + ".tmp"
                torch.save(_teacher_state(base_result["run_dir"]), tmp)
                os.replace(tmp, teacher_path)
            with open(teacher_path, "rb") as fh:
                teacher_bytes = fh.read()
            trial_raw["teacher"] = {"model": base.teacher.model, "args": base.teacher.args,
                                    "checkpoint": teacher_path}
        if search.workers_per_trial == 0:
            trial_raw["checkpoint"] = {**trial_raw["checkpoint"], "every_epochs": _checkpoint_every(
                search, info, base.checkpoint.every_epochs)}
        setup = TrialSetup(base=trial_raw, space=space, trials_dir=os.path.join(sweep_dir, "trials"),
                           metrics=search.metrics, parent_run_id=parent, tracking_uri=uri,
                           workers=search.workers_per_trial, cpus_per_trial=search.cpus_per_trial,
                           latency_batch=search.latency_batch, num_classes=info["num_classes"],
                           input_shape=info["input_shape"], teacher_path=teacher_path, teacher_bytes=teacher_bytes)
        results = _run_tune(setup, space, search, sweep_dir, info, base, log)
        df = _trial_rows(results, setup, space, search, info)
        failed = df[df["status"] == "error"] if len(df) else df
        if len(failed):
            log(f"{len(failed)} trial(s) failed, e.g. {failed.iloc[0]['name']}: {failed.iloc[0]['error']}")
            if len(failed) == len(df):
                raise RuntimeError(f"every trial failed; {failed.iloc[0]['name']}: {failed.iloc[0]['error']}")
        if tracking:
            deleted = tracking.reconcile({row["name"]: (row["run_id"] or None) for _, row in df.iterrows()})
            if deleted:
                log(f"MLflow: removed {len(deleted)} run(s) of trials Tune never recorded")
            for _, row in df[df["status"] == "early_stopped"].iterrows():
                mark_early_stopped(uri, row["run_dir"], int(row["epoch"]))
        df = _reevaluate(df, setup, search, state, state_path, log, base.checkpoint.every_epochs)
        df, best_idx = _select(df, search)
        best = df.loc[best_idx].to_dict() if best_idx is not None else None
        best_params = dict(setup.params(best["optuna_params"])) if best else {}
        best_config = None
        if best:
            job = setup.job_config(best["optuna_params"], f"{name}-best", os.path.abspath(base.output_dir))
            job["checkpoint"] = base.checkpoint.model_dump(mode="json")
            best_config = load_config(job).model_dump(mode="json")
        pareto = df[df["pareto"]].sort_values(search.metrics[1] if search.multi_objective else "val_top1")
        result = SweepResult(best_config, best_params, best, pareto.reset_index(drop=True), df, base_result,
                             list(search.objectives), sweep_dir, uri, parent, smaller=_smaller(df, base_result))
        if tracking and not state.get("logged"):
            _log_outcome(tracking, result, info, search, state, state_path, setup, log)
        result.registered = state.get("registered")
        if tracking:
            tracking.finish()
        state["finished"] = True
        write_state(state_path, state)
        return result
    except BaseException as err:
        if tracking:
            tracking.fail(err)
        raise


def _log_outcome(tracking, result: SweepResult, info: dict, search: SearchSpec, state: dict, state_path: str,
                 setup: TrialSetup, log) -> None:
    import yaml

    from kdray.search import plots

    df = result.trials
    for _, row in df.iterrows():
        if row["run_id"]:
            try:
                tracking.tag_trial(row["run_id"], {"kdray.sweep.trial_id": row["trial_id"],
                                                   "kdray.sweep.status": row["status"],
                                                   "kdray.sweep.pareto": bool(row["pareto"])})
            except Exception:  # noqa: BLE001  (a run deleted by hand)
                pass
    base, best = result.base, result.best
    metrics = {"base_val_top1": base["val_top1"], "base_test_top1": base["test_top1"], "base_params": base["params"],
               "n_trials": len(df), "n_full_budget": int(df["full_budget"].sum()) if len(df) else 0,
               "n_early_stopped": int((df["status"] == "early_stopped").sum()) if len(df) else 0,
               "n_pareto": len(result.pareto), "total_trial_epochs": int(df["trial_epochs"].sum()) if len(df) else 0,
               "grace_period": info["grace"], "max_t": info["max_t"]}
    params: dict[str, str] = {}
    texts: dict[str, str] = {}
    if best:
        metrics.update(best_val_top1=best["val_top1"], best_test_top1=best["test_top1"], best_params=best["params"])
        params = {f"best.{k}": json.dumps(v) if isinstance(v, (list, dict)) else str(v)
                  for k, v in result.best_params.items()}
        params["best.trial"] = best["name"]
    if result.smaller:
        metrics.update(smaller_val_top1=result.smaller["val_top1"], smaller_test_top1=result.smaller["test_top1"],
                       smaller_params=result.smaller["params"])
        params["smaller.trial"] = result.smaller["name"]
        texts["best_config.yaml"] = yaml.safe_dump(result.best_config, sort_keys=False)
    table = df.drop(columns=["optuna_params", "run_dir"], errors="ignore")
    texts["trials.csv"] = table.to_csv(index=False)
    texts["pareto.csv"] = result.pareto.drop(columns=["optuna_params", "run_dir"], errors="ignore").to_csv(index=False)
    texts["summary.md"] = result.summary()
    figures = {"accuracy_vs_size.png": plots.accuracy_vs_size(df, base, "params", result.path.rsplit(os.sep, 1)[-1])}
    if "latency_ms" in search.metrics:
        figures["accuracy_vs_latency.png"] = plots.accuracy_vs_size(df, None, "latency_ms", "sweep")
    notes: list[str] = []
    try:
        study = plots.rebuild_study(df, info["distributions"], search.metrics, search.modes)
        extra, notes = plots.optuna_figures(study, search.metrics)
        figures.update(extra)
    except Exception as err:  # noqa: BLE001
        notes.append(f"optuna plots: {type(err).__name__}: {err}")
    if notes:
        texts["plots_notes.txt"] = "\n".join(notes)
        result.notes.extend(notes)
    tracking.log_outcome(metrics, params, texts, figures)
    for fig in figures.values():
        plots.close(fig)
    if best and search.register_model and not state.get("registered"):
        try:
            state["registered"] = _register_best(tracking, result, search, setup)
            log(f"registered the best student as {state['registered']['uri']} (alias champion)")
        except Exception as err:  # noqa: BLE001
            msg = f"model registry: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            result.notes.append(msg)
            log(msg)
    state["logged"] = True
    write_state(state_path, state)


def _register_best(tracking, result: SweepResult, search: SearchSpec, setup: TrialSetup) -> dict:
    from kdray.models import create_model
    from kdray.orchestrator.weights import load_weights
    from kdray.orchestrator.tracking import RUNS_FILE, download_model

    best = result.best
    with open(os.path.join(best["run_dir"], RUNS_FILE)) as fh:
        stage_runs = json.load(fh)["stages"]
    source = stage_runs[best["best_stage"]]
    previous = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        spec, state = download_model(f"runs:/{source}/model", tracking.uri)
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = previous
    model = create_model(spec["model"], spec["num_classes"], **spec.get("args", {}))
    load_weights(model, state, "best student", spec["num_classes"])
    name = search.model_name or f"{tracking.name}-student"
    description = (f"best student of sweep {tracking.name}: {spec['model']} {spec.get('args', {})}, "
                   f"val top-1 {best['val_top1']:.4f} (mean of {len(result.best_config['seeds'])} seed(s)), "
                   f"{int(best['params']):,} params")
    return tracking.register(model, name, source, description)
