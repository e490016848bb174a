"""MLflow tracking. The driver owns the runs; rank 0 of the workers only logs into runs it was handed.

Ray workers run in other working directories, so the driver resolves the tracking URI to an absolute
one and creates every run (one parent per job, one child per trained model) before any worker starts.
Run ids are written to ``<run_dir>/mlflow_runs.json`` so ``--resume`` reopens the same runs.
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
import time
import urllib.error
import urllib.request

from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from kdray.orchestrator.interrupts import holds_sigint
from kdray.orchestrator.run_dir import RUNS_FILE, file_lock  # noqa: F401  (RUNS_FILE: re-exported)

FAILURE_TAG = "kdray.failure_reason"


class TrackingUnreachableError(ConnectionError):
    pass


def resolve_tracking_uri(configured: str | None) -> str:
    """Config value, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``; made absolute."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + os.path.abspath(uri.removeprefix("sqlite:///"))
    elif uri.startswith("file:") and not uri.startswith("file:///"):
        uri = "file://" + os.path.abspath(uri.removeprefix("file:"))
    elif "://" not in uri:
        uri = "file://" + os.path.abspath(uri)
    _check_scheme(uri, "mlflow.tracking_uri" if configured else "MLFLOW_TRACKING_URI")
    return uri


# URI schemes MLflow builds a tracking store for (mlflow/tracking/_tracking_service/utils.py), besides plugins.
TRACKING_SCHEMES = ("file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks", "databricks-uc",
                    "uc")


def _check_scheme(uri: str, origin: str) -> None:
    """A URI MLflow has no store for fails here in one line, not as a registry traceback once runs are opened."""
    from importlib.metadata import entry_points

    from kdray.config import ConfigError

    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower()  # postgresql+psycopg2:// is postgresql
    if scheme in TRACKING_SCHEMES or scheme in {e.name for e in entry_points(group="mlflow.tracking_store")}:
        return
    raise ConfigError(f"{origin}={uri!r}: MLflow has no tracking store for scheme {scheme!r}; use "
                      f"sqlite:///path/mlflow.db, file:///dir, http(s)://server or a database URI (postgresql://...), "
                      f"or unset it for ./mlflow.db")


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail before training when an HTTP tracking server does not answer its health check."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
            if resp.status == 200:
                return
            reason = f"HTTP {resp.status}"
    except (urllib.error.URLError, OSError) as err:
        reason = str(getattr(err, "reason", err))
    raise TrackingUnreachableError(
        f"MLflow tracking server {uri} is unreachable ({reason}); start it or set MLFLOW_TRACKING_URI / mlflow.tracking_uri"
    )


def flatten(prefix: str, value, out: dict[str, str]) -> dict[str, str]:
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = str(value)[:6000]
    return out


def _artifact_root(uri: str) -> str | None:
    """Artifacts beside a local SQLite store (absolute), so workers in other directories find them."""
    if uri.startswith("sqlite:///"):
        return "file://" + os.path.join(os.path.dirname(uri.removeprefix("sqlite:///")), "mlruns")
    return None


def open_client(uri: str) -> MlflowClient:
    """An ``MlflowClient`` on ``uri``, creating a new local SQLite store safely.

    MLflow creates a SQLite store's schema (alembic migrations) when the first client opens it; two processes
    doing that at once on a new file fail with a schema-creation traceback (reproduced: 5 of 5 pairs of
    processes, one or both). The first use therefore runs under an ``flock`` on ``<db>.lock`` beside the store.
    """
    path = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else None
    if path is None or not os.path.isdir(os.path.dirname(path) or "."):
        return MlflowClient(uri)
    with file_lock(path + ".lock"):
        return MlflowClient(uri)


def experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    """The experiment's id, created when missing; another process creating it at the same time is fine."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_root(uri))
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def peer_run_key(stage: str, peer: int) -> str:
    """The name (and run-id key) of peer ``peer``'s run nested under an online stage's run."""
    return f"{stage}.peer{peer}"


class JobTracking:
    """Driver side: create or reopen the parent and child runs, close them with the job's outcome."""

    def __init__(self, uri: str, experiment: str, run_dir: str, parent_run_id: str | None = None):
        self.uri = uri
        self.outer_parent = parent_run_id
        self.client = open_client(uri)
        self.experiment = experiment
        self.run_dir = run_dir
        self.parent_id: str | None = None
        self.stage_ids: dict[str, str] = {}

    @property
    def runs_file(self) -> str:
        return os.path.join(self.run_dir, RUNS_FILE)

    @holds_sigint
    def start(self, job_name: str, config: dict, stages: list[dict], resume: bool) -> dict[str, str]:
        saved = self._load_ids() if resume else None
        # Who drives the job: `kdray runs --stale` closes RUNNING runs whose driver process is gone.
        driver = {"kdray.driver_pid": str(os.getpid()), "kdray.driver_host": socket.gethostname()}
        if saved:
            self.parent_id, self.stage_ids = saved["parent"], dict(saved["stages"])
            for run_id in [self.parent_id, *self.stage_ids.values()]:
                self._reopen(run_id)
            for key, value in {**driver, "kdray.resumed_at": time.strftime("%Y-%m-%dT%H:%M:%S")}.items():
                self.client.set_tag(self.parent_id, key, value)
        else:
            exp_id = experiment_id(self.client, self.experiment, self.uri)
            tags = {"kdray.job": job_name, "kdray.run_dir": self.run_dir, "kdray.role": "job", **driver}
            if self.outer_parent:
                tags["mlflow.parentRunId"] = self.outer_parent
            run = self.client.create_run(exp_id, run_name=job_name, tags=tags)
            self.parent_id = run.info.run_id
            self._log_params(self.parent_id, flatten("", config, {}))
            self._log_text(self.parent_id, "config.json", json.dumps(config, indent=2, default=str))
        exp_id = self.client.get_run(self.parent_id).info.experiment_id
        for stage in stages:
            if stage["name"] not in self.stage_ids:
                run = self.client.create_run(exp_id, run_name=stage["name"], tags={
                    "mlflow.parentRunId": self.parent_id, "kdray.job": job_name, "kdray.role": stage["kind"]})
                self.stage_ids[stage["name"]] = run.info.run_id
                self._log_params(run.info.run_id, flatten("", stage, {}))
            for k, model in enumerate(stage.get("peers", [])):  # online stages: one nested run per peer
                key = peer_run_key(stage["name"], k)
                if key in self.stage_ids:
                    continue
                run = self.client.create_run(exp_id, run_name=key, tags={
                    "mlflow.parentRunId": self.stage_ids[stage["name"]], "kdray.job": job_name,
                    "kdray.role": "peer"})
                self.stage_ids[key] = run.info.run_id
                self._log_params(run.info.run_id, {"peer": str(k), "model": model, "seed": str(stage["seed"])})
        self._save_ids()
        return dict(self.stage_ids)

    @holds_sigint
    def finish(self, summary: dict[str, float], table_md: str, figure=None) -> None:
        metrics = [Metric(k, float(v), int(time.time() * 1000), 0) for k, v in summary.items()]
        if metrics:
            self.client.log_batch(self.parent_id, metrics=metrics)
        self._log_text(self.parent_id, "results.md", table_md)
        if figure is not None:
            self.client.log_figure(self.parent_id, figure, "test_accuracy.png")
        for run_id in self.stage_ids.values():
            if self.client.get_run(run_id).info.status == "RUNNING":
                self.client.set_terminated(run_id, "FINISHED")
        self.client.set_terminated(self.parent_id, "FINISHED")

    @holds_sigint
    def fail(self, error: BaseException) -> None:
        """Mark the job and its unfinished children FAILED (KILLED on Ctrl-C), with the reason as a tag."""
        if self.parent_id is None:
            return
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        reason = (f"{type(error).__name__}: {error}" if str(error) else
                  "KeyboardInterrupt (Ctrl-C / SIGINT)" if status == "KILLED" else type(error).__name__)[:5000]
        for run_id in [*self.stage_ids.values(), self.parent_id]:
            try:
                if self.client.get_run(run_id).info.status == "RUNNING":
                    self.client.set_tag(run_id, FAILURE_TAG, reason)
                    self.client.set_terminated(run_id, status)
            except Exception:  # noqa: BLE001  (best effort while already failing)
                pass

    def _reopen(self, run_id: str) -> None:
        """On ``--resume``: a run left FAILED/KILLED (or RUNNING by a killed driver) is RUNNING again,
        without its old failure reason; finished stages stay FINISHED."""
        run = self.client.get_run(run_id)
        if run.info.status == "FINISHED" and run_id != self.parent_id:
            return
        if run.info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        if FAILURE_TAG in run.data.tags:
            try:
                self.client.delete_tag(run_id, FAILURE_TAG)
            except MlflowException as err:  # removed meanwhile by another process: that is the goal
                if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def _log_text(self, run_id: str, name: str, text: str) -> None:
        self.client.log_text(run_id, text, name)

    def _load_ids(self) -> dict | None:
        if not os.path.exists(self.runs_file):
            return None
        with open(self.runs_file) as fh:
            return json.load(fh)

    def _save_ids(self) -> None:
        os.makedirs(self.run_dir, exist_ok=True)
        tmp = self.runs_file + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({"uri": self.uri, "parent": self.parent_id, "stages": self.stage_ids}, fh, indent=2)
        os.replace(tmp, self.runs_file)


class StageLogger:
    """Worker side (rank 0): per-epoch metrics into a stage's run, then the final model and curves.

    Epoch metrics are buffered and written after the checkpoint that covers them; the unwritten ones also
    travel inside that checkpoint (:meth:`pending` / :meth:`restore`), so a crash between the checkpoint
    and the write loses nothing. A restart may still replay epochs that were written (Ray Train registers
    a checkpoint asynchronously, after the worker's ``report`` returned), so writes skip every
    ``(key, step)`` the run already holds: each epoch is in the run exactly once.
    """

    def __init__(self, uri: str, run_id: str):
        self.client = MlflowClient(uri)
        self.run_id = run_id
        self._pending: list[Metric] = []
        self._logged: set[tuple[str, int]] | None = None  # read from the run on the first flush

    def buffer(self, epoch: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, epoch) for k, v in metrics.items() if k != "epoch"]

    def pending(self) -> list[dict]:
        """The buffered metrics as plain values (``torch.load(weights_only=True)`` reads them back)."""
        return [{"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step} for m in self._pending]

    def restore(self, rows: list[dict]) -> None:
        self._pending = [Metric(r["key"], float(r["value"]), int(r["timestamp"]), int(r["step"]))
                         for r in rows] + self._pending

    @holds_sigint
    def flush(self) -> None:
        new = self._not_logged(self._pending)
        for i in range(0, len(new), 1000):
            self.client.log_batch(self.run_id, metrics=new[i:i + 1000])
        self._logged.update((m.key, m.step) for m in new)
        self._pending = []

    def _not_logged(self, metrics: list[Metric]) -> list[Metric]:
        if self._logged is None:
            self._logged = set()
            for key in self.client.get_run(self.run_id).data.metrics:
                self._logged.update((key, m.step) for m in self.client.get_metric_history(self.run_id, key))
        seen, out = set(self._logged), []
        for m in metrics:
            if (m.key, m.step) not in seen:
                seen.add((m.key, m.step))
                out.append(m)
        return out

    @holds_sigint
    def finish(self, final: dict[str, float], history: list[dict], model_state: dict, model_spec: dict) -> None:
        import torch

        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, 0) for k, v in final.items()]
        self.flush()
        with tempfile.TemporaryDirectory() as folder:
            model_dir = os.path.join(folder, "model")
            os.makedirs(model_dir)
            torch.save(model_state, os.path.join(model_dir, "state_dict.pt"))
            with open(os.path.join(model_dir, "model_spec.json"), "w") as fh:
                json.dump(model_spec, fh, indent=2)
            self.client.log_artifacts(self.run_id, model_dir, "model")
        if history:
            from kdray.orchestrator.plots import accuracy_curve

            self.client.log_figure(self.run_id, accuracy_curve(history), "accuracy_curve.png")
        self.client.set_terminated(self.run_id, RunStatus.to_string(RunStatus.FINISHED))


def download_model(uri: str, tracking_uri: str) -> tuple[dict, dict]:
    """Read a model logged by :class:`StageLogger` from ``runs:/<run_id>/model``: (spec, state_dict).
    The weights are read as tensors only (``read_weights``): an artifact holding pickled objects is refused."""
    import mlflow

    from kdray.orchestrator.job import read_weights

    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri)
    except Exception as err:  # noqa: BLE001  (mlflow raises several types here)
        raise FileNotFoundError(f"teacher.mlflow_uri {uri!r} could not be read: {err}") from None
    spec_path = os.path.join(local, "model_spec.json")
    if not os.path.exists(spec_path):
        raise FileNotFoundError(f"teacher.mlflow_uri {uri!r} holds no kdray model (model_spec.json missing)")
    with open(spec_path) as fh:
        spec = json.load(fh)
    state = read_weights(os.path.join(local, "state_dict.pt"), f"teacher.mlflow_uri {uri!r}: artifact")
    return spec, state
