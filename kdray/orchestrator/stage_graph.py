"""A job's stages as a graph of dependent Ray tasks (``ray.stage_tasks: true``).

Why: the default placement runs every stage of a job one after another inside one Ray Train run, so a
born-again chain, a TAKD pipeline and the other seeds' chains queue behind each other even when the
cluster has room. Here each stage is one ``@ray.remote`` task that receives the weights of the stages
that teach it (``teachers: ["stage:<name>"]``) as ObjectRefs of those stages' tasks, so Ray itself
schedules the DAG: born-again generation k waits for k-1, a TAKD assistant for its teacher, the student
for the last assistant, while independent stages (other seeds' chains, scratch baselines, the teachers
of an ensemble) run at the same time on whatever CPUs/GPUs are free.

Inside a task the stage runs exactly as in-process (``run_stage`` with a rank-0, world-1
:class:`WorkerContext`), so every scheme and method behaves the same and accuracies match the
in-process run of the same seeds. Persistence is per stage, under ``<run_dir>/stages/<name>/state.pt``
(written atomically): mid-stage checkpoints while it trains, then its result row and kept weights.
That file is what makes the graph restartable: the driver skips stages whose file holds a result
(``--resume``), a task resumes from its own mid-stage checkpoint, and a task whose worker process died
is re-run by Ray (``max_retries = ray.max_failures``) from that checkpoint. Application errors (a bad
config, a NaN loss) are not retried: they would fail again the same way.

The run directory must be visible to every node (the same assumption Ray Train makes of ``storage_path``).
"""
from __future__ import annotations

import dataclasses
import os
import socket
import time

import ray
import torch

from kdray.config import Config, ConfigError
from kdray.orchestrator.build import build_splits
from kdray.orchestrator.checkpoints import save_atomic
from kdray.orchestrator.interrupts import as_received
from kdray.orchestrator.job import run_stage
from kdray.orchestrator.placement import WorkerContext
from kdray.orchestrator.plan import Stage, get_scheme, plan_stages
from kdray.orchestrator.run_dir import Checkpoint, JobState, RunDir, read_checkpoint
from kdray.orchestrator.runtime import check_fits, ensure_ray, resolve_use_gpu

TASK_TAG = "kdray.ray_task_id"


class StageCheckpoints:
    """One stage's checkpoints, in the ``ctx.checkpoints`` interface ``run_stage`` writes to.

    ``run_stage`` hands over the whole job state (its teachers' weights included); only this stage's own
    row, weights and loop state are kept, since a re-run receives its teachers again from Ray. The
    stage-end save (``loop: None``) is the stage's result file; it is stamped ``finished_at``. Each save
    also names its writer (host, pid, Ray task), so an operator can tell which attempt wrote it.
    """

    def __init__(self, run_dir: str, stage: str):
        self.stage = stage
        self.path = RunDir(run_dir, "").stage_file(stage)
        self.finished_at: float | None = None

    def latest(self) -> dict | None:
        found = read_checkpoint(self.path)
        return found.to_payload() if found is not None else None

    def save(self, payload: dict, metrics: dict) -> None:
        given = Checkpoint.from_payload(payload)
        done = {k: dict(v) for k, v in given.state.done.items() if k == self.stage}
        if given.loop is None and self.stage in done:
            self.finished_at = time.time()
            done[self.stage]["finished_at"] = self.finished_at
        context = ray.get_runtime_context()
        own = JobState(done, {k: v for k, v in given.state.weights.items() if k == self.stage})
        writer = {"host": socket.gethostname(), "pid": os.getpid(), "ray_task_id": context.get_task_id() or ""}
        save_atomic(Checkpoint(own, self.stage, given.loop, writer).to_payload(), self.path)


def _task_device() -> torch.device:
    """The GPU Ray gave this task, else the CPU."""
    return torch.device("cuda") if ray.get_gpu_ids() else torch.device("cpu")


def _stage_task(cfg_json: dict, stage: Stage, run_dir: str, tracking_uri: str | None, stage_run_ids: dict,
                run: dict, teacher_names: list[str], *teacher_weights) -> tuple[dict, dict | None]:
    """One stage in its own Ray task: returns (result row, its weights if later stages need them).

    ``teacher_weights`` are top-level arguments, so Ray has resolved the teacher stages' ObjectRefs
    (and waited for those tasks) before this runs.
    """
    started_at = time.time()
    cfg = Config.model_validate(cfg_json)
    name = stage.name
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    checkpoints = StageCheckpoints(run_dir, name)
    saved = Checkpoint.from_payload(checkpoints.latest())
    if saved.finished(name):  # a retry after the result was written
        return saved.state.done[name], saved.state.weights.get(name)
    context = ray.get_runtime_context()
    loop = saved.loop
    stage = dataclasses.replace(stage, run_facts={
        "ray_task_id": context.get_task_id(), "ray_node_id": context.get_node_id(), "worker_pid": os.getpid(),
        "started_at": started_at, "resumed_from_epoch": int(loop["epoch"]) if loop is not None else 0})
    if tracking_uri and name in stage_run_ids:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri).set_tag(stage_run_ids[name], TASK_TAG, stage.run_facts["ray_task_id"])
    ctx = WorkerContext(device=_task_device(), checkpoints=checkpoints, tracking_uri=tracking_uri,
                        stage_run_ids=stage_run_ids, callbacks=list(run["callbacks"]),
                        log=(lambda msg: None) if run["quiet"] else (lambda msg: print(msg, flush=True)))
    splits = build_splits(cfg)
    job_state = JobState({}, dict(zip(teacher_names, teacher_weights)))
    result = run_stage(cfg, stage, splits, ctx, job_state, loop)
    row = {**result, "finished_at": checkpoints.finished_at}
    return row, job_state.weights.get(name) if stage.keep else None


def _finish_task(cfg_json: dict, stages: list[Stage], names: list[str], *rows_then_weights) -> dict:
    """The scheme's finish step (born-again: the ensemble of all generations), run once the stages it reads
    (``names``) have finished; returns the result rows it changed (born-again: each seed's last generation
    with ``ensemble_test_top1`` added)."""
    cfg = Config.model_validate(cfg_json)
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    rows, weights = rows_then_weights[:len(names)], rows_then_weights[len(names):]
    job_state = JobState({n: dict(r) for n, r in zip(names, rows)}, dict(zip(names, weights)))
    get_scheme(cfg.scheme).finish(cfg, stages, build_splits(cfg), WorkerContext(device=_task_device()), job_state)
    return {n: r for n, r in job_state.done.items() if r != dict(rows[names.index(n)])}


_stage_remote = ray.remote(num_returns=2)(_stage_task)
_finish_remote = ray.remote(_finish_task)


def run_stage_graph(cfg: Config, tracking_uri: str | None, stage_run_ids: dict[str, str], log=print, *,
                    callbacks: list | None = None, quiet: bool = False) -> list[dict]:
    """Submit every unfinished stage as a task wired to its teachers' tasks, wait for all, return one
    row per stage in plan order. Independent stages keep running when one fails (their results are
    persisted for ``--resume``); the first failure is raised at the end. On Ctrl-C or SIGTERM (the CLI
    raises it as ``Terminated``, a ``KeyboardInterrupt``), unfinished tasks are cancelled. ``callbacks``
    (picklable epoch callbacks) run in every stage task; ``quiet``: the tasks print no progress lines."""
    ensure_ray(cfg.ray.address)
    run_dir = cfg.run_dir()
    job_dir = RunDir(run_dir, cfg.name)
    stages = plan_stages(cfg)
    cfg_json = cfg.model_dump(mode="json")
    run = {"callbacks": list(callbacks or []), "quiet": quiet}
    use_gpu = resolve_use_gpu(cfg)
    check_fits(cfg, 1, use_gpu)  # a task no node can hold would wait forever
    resources = {"num_cpus": cfg.ray.cpus_per_worker, "num_gpus": 1 if use_gpu else 0}
    rows: dict[str, object] = {}  # name -> result row, or the ObjectRef of the task that computes it
    weights: dict[str, object] = {}  # name -> ObjectRef of a kept stage's weights

    def weights_ref(name: str):
        if name not in weights:  # finished in an earlier run: hand its persisted weights to Ray once
            weights[name] = ray.put(job_dir.finished_stage(name).state.weights[name])
        return weights[name]

    pending: dict = {}
    for stage in stages:
        name = stage.name
        saved = job_dir.finished_stage(name)
        if saved is not None:
            rows[name] = saved.state.done[name]
            log(f"[{name}] finished in an earlier run; skipped")
            continue
        deps = stage.stage_teachers()
        row_ref, weights[name] = _stage_remote.options(
            name=f"kdray:{cfg.name}:{name}", max_retries=cfg.ray.max_failures, retry_exceptions=False,
            **resources,
        ).remote(cfg_json, stage, run_dir, tracking_uri, stage_run_ids, run, deps, *[weights_ref(d) for d in deps])
        rows[name], pending[row_ref] = row_ref, name
    reads = get_scheme(cfg.scheme).finish_inputs(cfg, stages)  # the stages its finish step reads
    if reads:  # born-again: after every generation (the task keeps its name, kdray:<job>:ensemble)
        finish_ref = _finish_remote.options(name=f"kdray:{cfg.name}:ensemble", **resources).remote(
            cfg_json, stages, reads, *[rows[n] for n in reads], *[weights_ref(n) for n in reads])
        pending[finish_ref] = "generation ensemble"
    log(f"job {cfg.name}: {len(pending)} Ray tasks submitted ({len(stages)} stages)")
    errors, ensemble, start = [], {}, time.perf_counter()
    try:
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            label = pending.pop(ref)
            try:
                value = ray.get(ref)
            except Exception as err:  # noqa: BLE001  (logged now, raised once the others are done)
                log(f"[{label}] failed: {str(err).strip().splitlines()[-1]}")
                errors.append(err)
                continue
            if label == "generation ensemble":
                ensemble = value
            else:
                rows[label] = value
    except BaseException as err:
        for ref in pending:
            ray.cancel(ref, force=True)
        stop = as_received(err)  # SIGTERM's Terminated arrives from ray.wait as a plain KeyboardInterrupt
        if stop is err:
            raise
        raise stop from None
    if errors:
        cause = getattr(errors[0], "cause", None)  # a RayTaskError: a config error stays the user's one line
        if isinstance(cause, ConfigError):
            raise cause from None
        raise errors[0]
    log(f"job {cfg.name}: {len(stages)} stages done in {time.perf_counter() - start:.1f}s")
    return [{**rows[s.name], **ensemble.get(s.name, {})} for s in stages]
