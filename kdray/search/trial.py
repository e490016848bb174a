"""One Tune trial: a distillation job from the engine, reporting ``val_top1`` per epoch to Tune.

In-process trials (``search.workers_per_trial: 0``) call :func:`kdray.distill` with a callback that
reports to Tune. Larger students use Ray 2.60's Train-inside-Tune pattern: the trial function is a
driver that builds a ``TorchTrainer`` with N workers, a deterministic run name (the trial's), and a
``TuneReportCallback`` that forwards the workers' per-epoch reports to Tune.

What Tune sees per trial: epochs ``1..E-1`` of the first seed's distilled student (ASHA decides on
these), then one final report at epoch ``E`` with the mean over the configuration's seeds. A trial
whose job already finished (its result file exists, e.g. a sweep resumed after the driver died) reports
the stored result and trains nothing; an unfinished one resumes from its own checkpoint, into its own
MLflow runs.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

RESULT_FILE = "trial_result.json"


def trial_name(trial) -> str:
    """Deterministic per trial (Tune keeps trial ids across ``Tuner.restore``)."""
    trial_id = trial if isinstance(trial, str) else trial.trial_id
    return f"trial-{trial_id}"


@dataclass
class TrialSetup:
    """Everything a trial needs besides its sampled config; shipped once through the object store."""

    base: dict  # the base job config (JSON dict) with the sweep's teacher, seeds, placement and tracking
    space: Any  # Space | CallableSpace
    trials_dir: str
    metrics: list[str]
    parent_run_id: str | None = None
    tracking_uri: str | None = None
    workers: int = 0
    cpus_per_trial: float = 1.0
    latency_batch: int = 1
    num_classes: int = 10
    input_shape: tuple | None = (1, 8, 8)  # None: inputs are a mapping (text), no latency objective
    teacher_path: str | None = None
    teacher_bytes: bytes | None = field(default=None, repr=False)

    def params(self, config: dict) -> list[tuple[str, Any]]:
        return self.space.resolve(config)

    def job_config(self, config: dict, name: str, output_dir: str | None = None) -> dict:
        from kdray.search.space import apply_params

        raw = apply_params(self.base, self.params(config))
        raw["name"] = name
        raw["output_dir"] = output_dir or self.trials_dir
        return raw

    def ensure_teacher(self) -> None:
        """A node that cannot see the sweep's teacher file gets it from the object store."""
        if self.teacher_path and self.teacher_bytes and not os.path.isfile(self.teacher_path):
            os.makedirs(os.path.dirname(self.teacher_path), exist_ok=True)
            tmp = f"{self.teacher_path}.{os.getpid()}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(self.teacher_bytes)
            os.replace(tmp, self.teacher_path)


def model_metrics(cfg, setup: TrialSetup) -> dict[str, float]:
    """``params`` (student parameters) and, when it is an objective, ``latency_ms``: the median CPU
    forward time of a batch of ``search.latency_batch`` inputs, measured in the trial."""
    from kdray.models import create_model

    model = create_model(cfg.student.model, setup.num_classes, **cfg.student.args)
    out = {"params": float(sum(p.numel() for p in model.parameters()))}
    if "latency_ms" in setup.metrics:
        out["latency_ms"] = measure_latency(model, (setup.latency_batch, *setup.input_shape))
    return out


def measure_latency(model, shape: tuple, repeats: int = 30, warmup: int = 5) -> float:
    import torch

    model.eval()
    x = torch.randn(*shape)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000)
    return float(statistics.median(times))


def first_stage(cfg) -> str:
    """The stage whose epochs a trial reports to Tune: the first searched student (the first seed's)."""
    from kdray.orchestrator.plan import searched_stages

    return searched_stages(cfg)[0].name


class TuneEpochReporter:
    """Engine callback (in-process trials): report the first seed's epochs ``1..E-1`` to Tune."""

    def __init__(self, stage: str, epochs: int, extra: dict):
        self.stage, self.epochs, self.extra = stage, epochs, extra

    def on_epoch_end(self, epoch, metrics, loop):
        if metrics.get("stage") != self.stage or epoch + 1 >= self.epochs:
            return
        from ray import tune

        tune.report(epoch_report(metrics["val_top1"], epoch + 1, self.epochs, self.extra))


def epoch_report(val_top1: float, epoch: int, epochs: int, extra: dict) -> dict:
    return {"val_top1": float(val_top1), "epoch": epoch, "epochs": epochs, "trial_epochs": epoch,
            "full_budget": 0, "diverged": 0, **extra}


class TrainEpochReporter:
    """Engine callback inside Ray Train workers: every rank reports (a report is a barrier); the sweep's
    :class:`EpochTuneReportCallback` forwards only these reports to Tune."""

    def __init__(self, stage: str, epochs: int, extra: dict):
        self.stage, self.epochs, self.extra = stage, epochs, extra

    def on_epoch_end(self, epoch, metrics, loop):
        if metrics.get("stage") != self.stage or epoch + 1 >= self.epochs:
            return
        import ray.train

        ray.train.report({**epoch_report(metrics["val_top1"], epoch + 1, self.epochs, self.extra), "kdray_tune": 1})


def _tune_report_callback():
    """``TuneReportCallback`` that forwards only the per-epoch reports (the job's checkpoint reports carry
    other metrics, which Tune's searcher and scheduler would choke on)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochTuneReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if not metrics or not metrics[0].get("kdray_tune"):
                return
            item = {k: v for k, v in metrics[0].items() if k != "kdray_tune"}
            self._training_actor_item_queue.put(item)

    return EpochTuneReportCallback()


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=2, default=str)
    os.replace(tmp, path)


def job_run_id(run_dir: str) -> str | None:
    from kdray.orchestrator.tracking import RUNS_FILE

    saved = _read_json(os.path.join(run_dir, RUNS_FILE))
    return saved.get("parent") if saved else None


def mark_early_stopped(tracking_uri: str | None, run_dir: str, epoch: int | None = None) -> None:
    """ASHA stopped this trial: its job run and unfinished stage runs become KILLED, tagged as such."""
    if not tracking_uri:
        return
    from kdray.orchestrator.tracking import RUNS_FILE

    saved = _read_json(os.path.join(run_dir, RUNS_FILE))
    if not saved:
        return
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    for run_id in [saved["parent"], *saved.get("stages", {}).values()]:
        try:
            run = client.get_run(run_id)
        except Exception:  # noqa: BLE001
            continue
        if run.info.status in ("RUNNING", "FAILED", "KILLED"):
            client.set_tag(run_id, "kdray.early_stopped", "asha" if epoch is None else f"asha@epoch{epoch}")
            if "kdray.failure_reason" in run.data.tags:
                try:  # the stopped trial's own process may still be closing this run: idempotent removal
                    client.delete_tag(run_id, "kdray.failure_reason")
                except MlflowException as err:
                    if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                        raise
            if run.info.status != "KILLED":
                client.set_terminated(run_id, "KILLED")


def _finished_rows(cfg, tracking_uri: str | None) -> list[dict] | None:
    """Rows of a job whose stages all finished and whose MLflow run is closed (nothing left to do)."""
    from kdray.orchestrator.plan import plan_stages
    from kdray.orchestrator.run_dir import RunDir, read_checkpoint

    try:
        checkpoint = read_checkpoint(RunDir(cfg.run_dir(), cfg.name).checkpoint_file())
    except Exception:  # noqa: BLE001
        return None
    done = checkpoint.state.done if checkpoint is not None else {}
    stages = plan_stages(cfg)
    if checkpoint is None or any(s.name not in done for s in stages):
        return None
    if tracking_uri:
        run_id = job_run_id(cfg.run_dir())
        if run_id is None:
            return None
        from mlflow.tracking import MlflowClient

        if MlflowClient(tracking_uri).get_run(run_id).info.status != "FINISHED":
            return None
    return [done[s.name] for s in stages]


def summarize(rows: list[dict], cfg, extra: dict) -> dict:
    from kdray.orchestrator.plan import get_scheme

    distilled = [r for r in rows if r["kind"] == get_scheme(cfg.scheme).searched_kind_for(cfg)]
    val = [float(r["val_top1"]) for r in distilled]
    test = [float(r["test_top1"]) for r in distilled]
    out = {
        "val_top1": statistics.mean(val), "val_top1_std": statistics.stdev(val) if len(val) > 1 else 0.0,
        "test_top1": statistics.mean(test), "test_top1_std": statistics.stdev(test) if len(test) > 1 else 0.0,
        "epoch": cfg.train.epochs, "epochs": cfg.train.epochs, "trial_epochs": cfg.train.epochs * len(cfg.seeds),
        "full_budget": 1, "diverged": 0, "seeds": len(cfg.seeds), **extra,
    }
    best = max(distilled, key=lambda r: r["val_top1"])
    out["best_stage"] = best["name"]
    return out


def _is_divergence(err: BaseException) -> bool:
    from kdray.algorithms.engine import NonFiniteLossError

    seen = err
    for _ in range(5):
        if seen is None:
            break
        if isinstance(seen, NonFiniteLossError) or "NonFiniteLossError" in type(seen).__name__ or \
                "non-finite loss" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def config_key(params: list[tuple[str, Any]], seeds: list[int]) -> str:
    return json.dumps([sorted((p, json.dumps(v, sort_keys=True, default=str)) for p, v in params), list(seeds)])


def find_finished(trials_dir: str, key: str, own: str) -> tuple[str, dict] | None:
    """A trial that already trained this exact configuration (same seeds) at full budget. Training is
    seeded, so running it again would give the same numbers; discrete spaces make such repeats common."""
    if not os.path.isdir(trials_dir):
        return None
    for name in sorted(os.listdir(trials_dir)):
        if name == own:
            continue
        stored = _read_json(os.path.join(trials_dir, name, RESULT_FILE))
        if stored and stored.get("config_key") == key and stored.get("full_budget") and \
                not stored.get("duplicate_of") and not stored.get("diverged"):
            return name, stored
    return None


def _duplicate_run(setup: TrialSetup, name: str, run_dir: str, original: str, final: dict) -> str:
    """A repeated configuration still gets its MLflow run under the sweep: the original's numbers, a tag
    naming the original, no training."""
    if not setup.tracking_uri or not setup.parent_run_id:
        return ""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from kdray.orchestrator.tracking import RUNS_FILE

    existing = job_run_id(run_dir)
    if existing:
        return existing
    client = MlflowClient(setup.tracking_uri)
    exp_id = client.get_run(setup.parent_run_id).info.experiment_id
    run = client.create_run(exp_id, run_name=name, tags={
        "mlflow.parentRunId": setup.parent_run_id, "kdray.job": name, "kdray.role": "job",
        "kdray.duplicate_of": original, "mlflow.note.content": f"same configuration and seeds as {original}; "
                                                                 f"not trained again"})
    now = int(time.time() * 1000)
    metrics = {k: v for k, v in final.items() if k in ("val_top1", "val_top1_std", "test_top1", "test_top1_std",
                                                        "params", "latency_ms")}
    client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    client.set_terminated(run.info.run_id, "FINISHED")
    _write_json(os.path.join(run_dir, RUNS_FILE), {"uri": setup.tracking_uri, "parent": run.info.run_id,
                                                   "stages": {}})
    return run.info.run_id


def run_trial(config: dict, setup: TrialSetup) -> None:
    """The Tune function of one trial."""
    import torch
    from ray import tune

    from kdray.config import load_config

    name = trial_name(tune.get_context().get_trial_id())
    setup.ensure_teacher()
    raw = setup.job_config(config, name)
    run_dir = os.path.join(setup.trials_dir, name)
    result_file = os.path.join(run_dir, RESULT_FILE)
    stored = _read_json(result_file)
    if stored is not None:  # finished before the driver died: report it again, train and log nothing
        tune.report(stored)
        return
    cfg = load_config(raw)
    key = config_key(setup.params(config), cfg.seeds)
    duplicate = find_finished(setup.trials_dir, key, name)
    if duplicate is not None:  # the same configuration and seeds already ran at full budget: reuse it
        final = {**duplicate[1], "trial_epochs": 0, "duplicate_of": duplicate[0], "config_key": key}
        final["mlflow_run_id"] = _duplicate_run(setup, name, run_dir, duplicate[0], final)
        _write_json(result_file, final)
        tune.report(final)
        return
    torch.set_num_threads(max(1, int(setup.cpus_per_trial)))
    extra = model_metrics(cfg, setup)
    stage, epochs = first_stage(cfg), cfg.train.epochs
    try:
        rows = _finished_rows(cfg, setup.tracking_uri)
        if rows is None:  # the job itself, through the one lifecycle every job has (kdray.distill)
            from kdray.orchestrator.api import distill

            in_process = setup.workers == 0  # else Train-inside-Tune: the job is a TorchTrainer run of its own
            reporter = (TuneEpochReporter if in_process else TrainEpochReporter)(stage, epochs, extra)
            rows = distill(cfg, resume=True, callbacks=[reporter],
                           run_callbacks=[] if in_process else [_tune_report_callback()], quiet=True,
                           parent_run_id=setup.parent_run_id, log=lambda msg: None).stages
        final = summarize(rows, cfg, extra)
    except SystemExit:  # Tune stopped the trial (ASHA) while it reported
        mark_early_stopped(setup.tracking_uri, run_dir)
        raise
    except Exception as err:  # noqa: BLE001
        if not _is_divergence(err):
            raise
        final = {"val_top1": 0.0, "val_top1_std": 0.0, "epoch": epochs, "epochs": epochs,
                 "trial_epochs": epochs, "full_budget": 1, "diverged": 1, "seeds": len(cfg.seeds),
                 "error": str(err).splitlines()[0][:300], **extra}
    final["mlflow_run_id"] = job_run_id(run_dir) or ""
    final["config_key"] = key
    _write_json(result_file, final)
    tune.report(final)


def continue_job(job: dict, parent_run_id: str | None, extra: dict, threads: int = 1) -> dict:
    """Finish a trial's job at full budget (an ASHA-stopped Pareto candidate): ``distill`` resumes it from
    its last checkpoint, into its own MLflow runs. Runs in the driver or as a Ray task."""
    import torch

    from kdray.config import load_config
    from kdray.orchestrator.api import distill

    if threads:
        torch.set_num_threads(max(1, int(threads)))
    cfg = load_config(job)
    try:
        outcome = distill(cfg, resume=True, parent_run_id=parent_run_id, log=lambda msg: None)
    except Exception as err:  # noqa: BLE001
        if not _is_divergence(err):
            raise
        return {"val_top1": 0.0, "diverged": 1, "error": str(err).splitlines()[0][:300]}
    return summarize(outcome.stages, cfg, extra)
