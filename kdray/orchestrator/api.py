"""``kdray.distill``: validate, check everything checkable, open MLflow runs, run the job, close the runs."""
from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from kdray.config import Config, ConfigError, load_config
from kdray.orchestrator.build import (build_splits, build_teacher_model, create_spec_model, example_batch,
                                      teacher_class_order)
from kdray.orchestrator.cache_store import uses_cache
from kdray.orchestrator.job import run_job
from kdray.orchestrator.placement import WorkerContext
from kdray.orchestrator.plan import TeacherSource, get_scheme, plan_stages
from kdray.orchestrator.run_dir import RunDir
from kdray.orchestrator.teacher_cache import preflight_cache
from kdray.orchestrator.tracking import tracking_uri_for


@dataclass
class DistillResult:
    """What a job produced: one row per stage, the MLflow parent run, and a summary by stage kind."""

    stages: list[dict]
    tracking_uri: str | None
    parent_run_id: str | None
    run_dir: str

    def accuracies(self, kind: str) -> list[float]:
        return [s["test_top1"] for s in self.stages if s["kind"] == kind]

    def kinds(self) -> list[str]:
        return list(dict.fromkeys(s["kind"] for s in self.stages))

    def summary(self) -> dict[str, float]:
        out = {}
        for kind in self.kinds():
            acc = [a for a in self.accuracies(kind) if a == a]  # NaN: a stage with no test (a synthesis)
            if acc:
                out[f"{kind}_test_top1_mean"] = statistics.mean(acc)
                if len(acc) > 1:
                    out[f"{kind}_test_top1_std"] = statistics.stdev(acc)
        return out

    def table(self) -> str:
        rows = ["| stage | model | seed | test top-1 | params |", "|---|---|---|---|---|"]
        for s in self.stages:
            params = f"{s['params']:,}" if "params" in s else "-"  # a stage that trains no model (a synthesis)
            rows.append(f"| {s['name']} | {s['model']} | {s['seed']} | {s['test_top1']:.4f} | {params} |")
        for kind in self.kinds():
            acc = self.accuracies(kind)
            if len(acc) > 1:
                seeds = {s["seed"] for s in self.stages if s["kind"] == kind}
                count = f"{len(acc)} seeds" if len(seeds) == len(acc) else f"{len(acc)} runs"  # e.g. M teachers
                rows.append(f"| **{kind} mean +- std** | | {count} | "
                            f"{statistics.mean(acc):.4f} +- {statistics.stdev(acc):.4f} | |")
        return "\n".join(rows)


def check_vocabularies(cfg: Config, models: list[tuple[str, object]]) -> None:
    """Text jobs: every text model reads the token ids of the data's tokenizer (``data.options.tokenizer``),
    else a one-line :class:`ConfigError` before training (ids past a student's embedding table would crash
    mid-step; another tokenizer's ids would train on scrambled words)."""
    tokenizer = cfg.data.options.get("tokenizer")
    if tokenizer is None:
        return
    from kdray.models.text import TextModel, vocab_mismatch

    for path, model in models:
        if isinstance(model, TextModel):
            reason = vocab_mismatch(tokenizer, model, path)
            if reason is not None:
                raise ConfigError(reason)


def check_input_width(cfg: Config, splits, path: str, model, inputs) -> None:
    """A model that declares the width of the vectors it reads (``in_features``: node models, vector MLPs)
    against the width of the data's ``inputs`` it is given, checked where preflight builds it, before running
    it: one line naming both widths and the fix instead of a matrix-shape error from inside the model."""
    width = getattr(model, "in_features", None)
    if not isinstance(width, int) or not isinstance(inputs, torch.Tensor) or inputs.dim() < 2:
        return
    have = inputs.shape[-1]
    if width != have:
        what = "the graph's nodes" if splits.graph is not None else f"dataset {cfg.data.name!r}'s inputs"
        raise ConfigError(f"{path}.args.in_features is {width} but {what} have {have} features; "
                          f"set {path}.args.in_features: {have}")


def preflight(cfg: Config) -> None:
    """Checks that need data or models but no training: files exist, shapes and class counts agree,
    feature points resolve. Each failure is a one-line :class:`ConfigError`."""
    try:
        splits = build_splits(cfg)
        if splits.check_files is not None:  # e.g. every ImageFolder file opens as an image, before any training
            splits.check_files()
    except TypeError as err:
        raise ConfigError(f"data.options: {err}") from None
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"data: {err}") from None
    try:
        get_scheme(cfg.scheme).check_data(cfg, splits)
    except ValueError as err:
        raise ConfigError(str(err).splitlines()[0]) from None
    if uses_cache(cfg):  # teacher outputs come from a cache: check it, build no teacher
        return preflight_cache(cfg, splits, tracking_uri_for(cfg))
    example = example_batch(splits.train)
    paths = [path for path, _ in cfg.teacher_paths()]
    sources = [TeacherSource("spec", path) for path in paths]
    orders = [teacher_class_order(cfg, src, splits.classes) for src in sources]  # before loading weights
    scheme = get_scheme(cfg.scheme)
    try:
        teacher_models, model_paths = [], []
        for (path, spec), source in zip(cfg.teacher_paths(), sources):
            teacher_models.append(create_spec_model(spec, path, splits.num_classes) if spec.train is not None
                                  else build_teacher_model(cfg, source, splits.num_classes, {},
                                                           tracking_uri_for(cfg)))
            model_paths.append(path)
        for path, spec in scheme.models(cfg):  # assistants, peers: they build, classes agree
            teacher_models.append(create_spec_model(spec, path, splits.num_classes))
            model_paths.append(path)
        with torch.no_grad():
            for model, path in zip(teacher_models, model_paths):
                inputs = scheme.model_inputs(cfg, path, example)
                check_input_width(cfg, splits, path, model, inputs)
                classes = model.eval()(inputs).shape[1]
                if getattr(model, "outputs_classes", True) and classes != splits.num_classes:
                    raise ConfigError(f"a teacher ({type(model).__name__}) outputs {classes} classes but dataset "
                                      f"{cfg.data.name!r} has {splits.num_classes}")
        student = create_spec_model(cfg.student, "student", splits.num_classes)
        check_input_width(cfg, splits, "student", student, scheme.model_inputs(cfg, "student", example))
        check_vocabularies(cfg, [("student", student)] + list(zip(model_paths, teacher_models)))
        scheme.preflight(cfg, splits, example, student, teacher_models[: len(paths)], orders)
    except ConfigError:
        raise
    except (ValueError, TypeError, RuntimeError, FileNotFoundError) as err:
        raise ConfigError(str(err).splitlines()[0]) from None


def _check_run_dir(cfg: Config, job_dir: RunDir, resume: bool, log) -> None:
    """Under the job's lock: a job with results needs ``--resume``, and ``--resume`` needs the config that
    made the job (and its MLflow store); a ``--resume`` of a job that never ran says so and starts it."""
    if not job_dir.has_results():
        if resume:
            log(f"job {cfg.name!r} has not run in {cfg.run_dir()} yet: starting it")
        return
    if not resume:
        raise ConfigError(f"job {cfg.name!r} already has results in {cfg.run_dir()}; pass --resume to continue it "
                          f"or choose another name=")
    job_dir.check_same_config(cfg.model_dump(mode="json"),
                              normalize=lambda saved: type(cfg).model_validate(saved).model_dump(mode="json"))
    tracked, uri = job_dir.tracked_in(), tracking_uri_for(cfg)
    if tracked and uri and tracked != uri:
        raise ConfigError(f"job {cfg.name!r} in {cfg.run_dir()} is tracked in {tracked}, not {uri}; resume with "
                          f"mlflow.tracking_uri={tracked}, or choose another name=")


def distill(config: str | dict | Config, *, overrides: list[str] | None = None, resume: bool = False,
            log=print, callbacks: list | None = None, run_callbacks: list | None = None, quiet: bool = False,
            parent_run_id: str | None = None) -> DistillResult:
    """Run a distillation job (teacher stage, then students per seed) and track it in MLflow.

    ``ray.num_workers: 0`` runs in this process; otherwise the job is one Ray Train run with that many
    data-parallel workers (or, with ``ray.stage_tasks``, one Ray task per stage), on the Ray cluster at
    ``ray.address`` / ``RAY_ADDRESS`` or a local Ray.

    ``callbacks``: engine epoch callbacks (``on_epoch_end(epoch, metrics, loop)``, metrics naming their
    ``stage`` and ``kind``), run wherever the stage trains: in this process, or in every Ray Train worker /
    stage task (there they must pickle). ``run_callbacks``: Ray Train ``RunConfig`` callbacks on the driver,
    for a job that runs as a Ray Train run (a sweep passes its Tune reporter). ``quiet``: no per-epoch
    progress lines. ``parent_run_id`` nests the job's MLflow run under another (a sweep's).
    """
    cfg = load_config(config, overrides)
    job_dir = RunDir(cfg.run_dir(), cfg.name)
    job_dir.check_writable()
    _check_run_dir(cfg, job_dir, resume, log)
    preflight(cfg)  # every check before the lock, which creates the job directory: a refused job writes nothing
    uri = tracking_uri_for(cfg)
    if uri is not None:
        from kdray.orchestrator.tracking import check_reachable

        check_reachable(uri)
    with job_dir.lock():  # one driver per job directory, from the first check to the last write
        _check_run_dir(cfg, job_dir, resume, lambda message: None)  # again: another driver may have run meanwhile
        if job_dir.saved_config() is None or not job_dir.has_results():
            job_dir.save_config(cfg.model_dump(mode="json"))
        return _run(cfg, resume, log, list(callbacks or []), list(run_callbacks or []), quiet, parent_run_id)


def _run(cfg: Config, resume: bool, log, callbacks: list, run_callbacks: list, quiet: bool,
         parent_run_id: str | None) -> DistillResult:
    """The job, under its lock: open (or reopen) its MLflow runs, run its stages, close the runs."""
    uri = tracking_uri_for(cfg)
    tracking = None
    if uri is not None:
        from kdray.orchestrator.tracking import JobTracking

        tracking = JobTracking(uri, cfg.mlflow.experiment, cfg.run_dir(), parent_run_id)
    stages = plan_stages(cfg)
    try:
        stage_ids = (tracking.start(cfg.name, cfg.model_dump(mode="json"), stages, resume)
                     if tracking else {})
        if cfg.ray.num_workers == 0:
            from kdray.orchestrator.checkpoints import LocalCheckpoints

            ctx = WorkerContext(checkpoints=LocalCheckpoints(cfg.run_dir()), tracking_uri=uri,
                                stage_run_ids=stage_ids, log=(lambda msg: None) if quiet else log,
                                callbacks=callbacks)
            results = run_job(cfg, ctx)
        elif cfg.ray.stage_tasks:  # each stage its own Ray task, scheduled as a DAG of teacher -> student
            from kdray.orchestrator.stage_graph import run_stage_graph

            results = run_stage_graph(cfg, uri, stage_ids, log, callbacks=callbacks, quiet=quiet)
        else:
            from kdray.orchestrator.ray_runner import run_on_ray

            results = run_on_ray(cfg, uri, stage_ids, epoch_callbacks=callbacks, run_callbacks=run_callbacks,
                                 quiet=quiet)
        outcome = DistillResult(results, uri, tracking.parent_id if tracking else None, cfg.run_dir())
        if tracking:
            from kdray.orchestrator.interrupts import sigint_held
            from kdray.orchestrator.plots import grouped_bars

            with sigint_held():  # a Ctrl-C inside matplotlib's C init would surface as an ImportError
                groups = {k: outcome.accuracies(k) for k in outcome.kinds()}
                tracking.finish(outcome.summary(), outcome.table(),
                                grouped_bars(groups, "test top-1", f"{cfg.name}: test accuracy"),
                                get_scheme(cfg.scheme).job_figures(cfg, outcome.stages))
        return outcome
    except BaseException as err:
        if tracking:
            tracking.fail(err)
        raise
