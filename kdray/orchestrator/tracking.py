"""MLflow tracking. The driver owns the runs; rank 0 of the workers only logs into runs it was handed.

Ray workers run in other working directories, so the driver resolves the tracking URI to an absolute
one and creates every run (one parent per job, one child per trained model) before any worker starts.
Run ids are written to ``<run_dir>/mlflow_runs.json`` so ``--resume`` reopens the same runs.

What the MLflow UI shows (3.x): the experiment is tagged as model training (``mlflow.experimentKind``) so it
opens on its training runs, not the GenAI view; every trained model is an MLflow *logged model* (and a
registry version) beside the weights-only ``model/`` artifact kdray itself reads; stage runs list their
datasets and carry system metrics (CPU, memory, GPU where present); the job run's description is its
results table.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import time
import urllib.error
import urllib.request

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from kdray.orchestrator.interrupts import holds_sigint
from kdray.orchestrator.mlflow_internals import fluent_store, quiet_logger, start_system_metrics, stop_system_metrics
from kdray.orchestrator.run_dir import RUNS_FILE, file_lock  # noqa: F401  (RUNS_FILE: re-exported)

FAILURE_TAG = "kdray.failure_reason"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # read by the MLflow UI to pick the experiment's view
TRAINING_KIND = "custom_model_development"  # the UI's "Training runs" view
NOTE_TAG = "mlflow.note.content"  # a run's description in the UI (Markdown)
MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # on a logged model: the registry versions made from it
REGISTERED_MODEL_TAG = "kdray.registered_model"
MODEL_LOG_ERROR_TAG = "kdray.model_log_error"  # why a stage's model is not an MLflow logged model  # on a stage run: the registry name its model is entered under


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


def tracking_uri_for(cfg) -> str | None:
    """The job's resolved tracking URI (see :func:`resolve_tracking_uri`), or None with ``mlflow.enabled: false``;
    the one reading of ``cfg.mlflow`` that distill, the teacher cache and sweeps share."""
    if not cfg.mlflow.enabled:
        return None
    return resolve_tracking_uri(cfg.mlflow.tracking_uri)


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


def mark_training_experiment(client: MlflowClient, exp_id: str) -> None:
    """Tag the experiment as model training so the MLflow UI opens it on "Training runs" (untagged, MLflow 3
    opens the GenAI view: traces, sessions, evaluation runs). A kind the UI merely inferred is replaced; an
    explicit ``genai_development`` someone chose for the experiment is kept."""
    kind = client.get_experiment(exp_id).tags.get(EXPERIMENT_KIND_TAG)
    if kind not in (TRAINING_KIND, "genai_development"):
        client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)


def training_runs_links(uri: str, base: str) -> list[tuple[str, str]]:
    """(experiment, link) for each kdray experiment in the store: its runs in the UI's "Model training" view.

    MLflow 3.17.2's UI picks the view from its GenAI / Model training switch (the ``workflowType`` URL
    parameter, else the browser's saved choice, GenAI by default), not from the experiment's kind tag: a
    plain ``#/experiments/<id>`` link opens the GenAI overview. Empty when the store cannot be read."""
    if uri.startswith("sqlite:///") and not os.path.exists(uri.removeprefix("sqlite:///")):
        return []  # do not create a store just to list it
    if uri.startswith(("http://", "https://")):
        try:  # MLflow's client retries an unreachable server for minutes
            check_reachable(uri, timeout_s=2.0)
        except TrackingUnreachableError:
            return []
    try:
        exps = MlflowClient(uri).search_experiments(
            filter_string=f"tags.`{EXPERIMENT_KIND_TAG}` = '{TRAINING_KIND}'")
    except Exception:  # noqa: BLE001  (links are a convenience; the UI itself reports store errors)
        return []
    return [(e.name, f"{base.rstrip('/')}/#/experiments/{e.experiment_id}/runs?workflowType=machine_learning")
            for e in exps]


def dataset_inputs(name: str, splits) -> list[DatasetInput]:
    """The job's splits as MLflow dataset inputs (the runs table's Datasets column): one per split, with its
    row count and the input shape. The digest comes from the splits' fingerprint (data and transforms, as
    teacher caches check it) and the split's size: the same data gives the same digest in every run."""
    out = []
    for split, context in (("train", "training"), ("val", "validation"), ("test", "test")):
        rows = len(getattr(splits, split))
        digest = hashlib.sha256(f"{splits.fingerprint}:{split}:{rows}".encode()).hexdigest()[:10]
        source = json.dumps({"tags": {"kdray.dataset": name, "kdray.split": split}})
        profile = json.dumps({"num_rows": rows, "num_classes": splits.num_classes,
                              "input_shape": list(splits.input_shape)})
        out.append(DatasetInput(Dataset(name, digest, "code", source, None, profile),
                                [InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    return out


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
        mark_training_experiment(self.client, exp_id)
        for stage in stages:
            if stage.name not in self.stage_ids:
                run = self.client.create_run(exp_id, run_name=stage.name, tags={
                    "mlflow.parentRunId": self.parent_id, "kdray.job": job_name, "kdray.role": stage.kind,
                    **self._registry_tag(job_name, stage.kind)})
                self.stage_ids[stage.name] = run.info.run_id
                self._log_params(run.info.run_id, flatten("", stage.row(), {}))
            for k, model in enumerate(stage.peers or ()):  # online stages: one nested run per peer
                key = peer_run_key(stage.name, k)
                if key in self.stage_ids:
                    continue
                run = self.client.create_run(exp_id, run_name=key, tags={
                    "mlflow.parentRunId": self.stage_ids[stage.name], "kdray.job": job_name,
                    "kdray.role": "peer", **self._registry_tag(job_name, "peer")})
                self.stage_ids[key] = run.info.run_id
                self._log_params(run.info.run_id, {"peer": str(k), "model": model, "seed": str(stage.seed)})
        self._save_ids()
        return dict(self.stage_ids)

    def _registry_tag(self, job_name: str, role: str) -> dict[str, str]:
        """Where a stage's model is registered: ``<job>-<role>`` (``t-teacher``, ``t-distill``, one version
        per seed/method, tagged with its stage); none for a sweep's trials, whose best student the sweep
        registers itself."""
        return {} if self.outer_parent else {REGISTERED_MODEL_TAG: f"{job_name}-{role}"}

    @holds_sigint
    def finish(self, summary: dict[str, float], table_md: str, figure=None, figures: dict | None = None) -> None:
        """The job's summary metrics, results table and figures (``test_accuracy.png`` and ``figures`` by artifact
        name) on the parent run; then every run FINISHED."""
        metrics = [Metric(k, float(v), int(time.time() * 1000), 0) for k, v in summary.items()]
        if metrics:
            self.client.log_batch(self.parent_id, metrics=metrics)
        self._log_text(self.parent_id, "results.md", table_md)
        self.client.set_tag(self.parent_id, NOTE_TAG, table_md)  # the run's description in the UI
        if figure is not None:
            self.client.log_figure(self.parent_id, figure, "test_accuracy.png")
        for name, extra in (figures or {}).items():
            self.client.log_figure(self.parent_id, extra, name)
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

    def __init__(self, uri: str, run_id: str, system_metrics: bool = False):
        self.client = MlflowClient(uri)
        self.uri = uri
        self.run_id = run_id
        self._pending: list[Metric] = []
        self._logged: set[tuple[str, int]] | None = None  # read from the run on the first flush
        if system_metrics:  # from here to :meth:`finish`: the stage's training (``mlflow.system_metrics``)
            start_system_metrics(uri, run_id)

    def buffer(self, epoch: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, epoch) for k, v in metrics.items() if k != "epoch"]

    def pending(self) -> list[dict]:
        """The buffered metrics as plain values (``torch.load(weights_only=True)`` reads them back)."""
        return [{"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step} for m in self._pending]

    def restore(self, rows: list[dict]) -> None:
        self._pending = [Metric(r["key"], float(r["value"]), int(r["timestamp"]), int(r["step"]))
                         for r in rows] + self._pending

    def log_epoch_figure(self, epoch: int, figure) -> None:
        """A matplotlib figure into the run as ``generated/epoch_NNNN.png``: one file per epoch, so a replayed
        epoch overwrites its own file instead of adding one (data-free samples)."""
        self.client.log_figure(self.run_id, figure, f"generated/epoch_{epoch:04d}.png")

    def log_epoch_text(self, epoch: int, text: str, folder: str) -> None:
        """Text into the run as ``<folder>/epoch_NNNN.txt`` (an LM's sampled generations), one file per epoch
        like :meth:`log_epoch_figure`."""
        self.client.log_text(self.run_id, text, f"{folder}/epoch_{epoch:04d}.txt")

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
    def finish(self, final: dict[str, float], history: list[dict], model_state: dict, model_spec: dict,
               example=None, dataset: str | None = None, splits=None) -> None:
        """Write the final metrics, the weights (``model/``, what kdray reads back), the datasets (``dataset``
        named, ``splits`` sized) and, given an input ``example`` batch, the model as an MLflow logged model
        (and registry version); then mark the run FINISHED. Every step is safe to repeat after a crash."""
        import torch

        stop_system_metrics(self.run_id)
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
        pretrained = self._log_pretrained(model_state, model_spec)
        if splits is not None:
            self.client.log_inputs(self.run_id, dataset_inputs(dataset or "data", splits))  # repeats are no-ops
        if example is not None or pretrained:  # a text student: mlflow.transformers, needs no example
            self._log_model(model_state, model_spec, example)
        if history:
            from kdray.orchestrator.plots import accuracy_curve

            self.client.log_figure(self.run_id, accuracy_curve(history), "accuracy_curve.png")
        self.client.set_terminated(self.run_id, RunStatus.to_string(RunStatus.FINISHED))

    @holds_sigint
    def finish_without_model(self, final: dict[str, float], figures: dict | None = None) -> None:
        """End a stage that trains no model (a synthesis stage): final metrics and figures, then FINISHED."""
        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, 0) for k, v in final.items()]
        self.flush()
        for name, figure in (figures or {}).items():
            self.client.log_figure(self.run_id, figure, name)
        self.client.set_terminated(self.run_id, RunStatus.to_string(RunStatus.FINISHED))

    def _log_pretrained(self, state: dict, spec: dict) -> bool:
        """A model with ``save_pretrained`` (a transformers text model) is also logged as the directory it writes
        (``hf_model/``: weights, config, tokenizer), so ``from_pretrained`` on the downloaded artifact loads it
        back, outside kdray (its MLflow logged model, in the ``transformers`` flavour, is :meth:`_log_model`'s).
        Whether one was logged."""
        from kdray.models import create_model, model_family

        if model_family(spec["model"]) != "text":
            return False
        model = create_model(spec["model"], spec["num_classes"], **spec.get("args", {}))
        if not hasattr(model, "save_pretrained"):  # a text model that is not a transformers one (text_bilstm)
            return False
        model.load_state_dict(state)
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(os.path.join(folder, "hf_model"))
            self.client.log_artifacts(self.run_id, os.path.join(folder, "hf_model"), "hf_model")
        return True

    def _log_model(self, state: dict, spec: dict, example) -> None:
        """The trained model as an MLflow logged model, so the UI lists it under "Logged models" and
        ``mlflow.pytorch.load_model("models:/<id>")`` returns it; registered under the run's
        ``kdray.registered_model`` tag.

        The module is rebuilt from its spec and weights on the CPU: the trained one may carry feature hooks
        (not picklable), sit on a GPU or inside a wrapper. It is saved in ``pickle`` format, which gives the
        kdray module itself back (``pt2`` gives a GraphModule without its methods, costs a ``torch.export``
        per model and fails on models export cannot trace). Loading a pickle runs code from the store: load
        these only from a store you trust. kdray never loads them; it reads teachers from the weights-only
        ``model/state_dict.pt``. A model that cannot be logged leaves a warning and a tag, not a failed stage.
        A transformers text student is logged with ``mlflow.transformers`` instead, with its tokenizer
        (:mod:`kdray.orchestrator.text_model_logging`: no pickle, and ``load_model`` gives a pipeline).
        """
        from mlflow.entities import LoggedModelStatus

        run = self.client.get_run(self.run_id)
        logged = [o.model_id for o in (run.outputs.model_outputs if run.outputs else [])]
        model_id = next((i for i in logged if self.client.get_logged_model(i).status == LoggedModelStatus.READY),
                        None)
        try:
            if model_id is None:
                model_id = self._save_model(run, state, spec, example)
            name = run.data.tags.get(REGISTERED_MODEL_TAG)
            if name:
                self._register(name, model_id, run)
            if MODEL_LOG_ERROR_TAG in run.data.tags:  # an earlier attempt failed; this one did not
                self.client.delete_tag(self.run_id, MODEL_LOG_ERROR_TAG)
        except Exception as err:  # noqa: BLE001  (the weights are logged; the MLflow model is a view on them)
            reason = f"{type(err).__name__}: {err}"[:5000]
            logging.getLogger(__name__).warning("run %s: the model was not logged as an MLflow model (%s)",
                                                run.info.run_name, reason)
            self.client.set_tag(self.run_id, MODEL_LOG_ERROR_TAG, reason)

    def _save_model(self, run, state: dict, spec: dict, example) -> str:
        from importlib.metadata import PackageNotFoundError, version

        import mlflow
        import torch
        from mlflow.models import infer_signature

        from kdray.models import create_model
        from kdray.orchestrator.text_model_logging import is_transformers_text, log_text_model

        model = create_model(spec["model"], spec["num_classes"], **spec.get("args", {}))
        model.load_state_dict(state)
        model.eval()
        text = is_transformers_text(model)
        if not text:
            example = example[:2].detach().cpu()
            with torch.no_grad():
                out = model(example)
            signature = infer_signature(example.numpy(), out.numpy() if torch.is_tensor(out) else None)
        # Stated, not inferred: MLflow infers requirements by loading the model in a subprocess (seconds).
        requirements = []
        for package in ("torch", "mlflow", "kdray") + (("transformers", "tokenizers") if text else ()):
            try:
                requirements.append(f"{package}=={version(package)}")
            except PackageNotFoundError:
                pass
        # An explicit experiment: left to itself, log_model outside an active run files the model under
        # the process's active experiment (the Default one), not the run's. A logged model's name may not
        # hold '/', ':', '.', '%' or quotes: a peer's run "dml-seed0.peer1" gives the model "dml-seed0-peer1".
        name = re.sub(r"[/:.%\"']", "-", run.info.run_name)
        logged = self.client.create_logged_model(run.info.experiment_id, name=name, source_run_id=self.run_id,
                                                 tags={"kdray.model": spec["model"]})
        if text:  # a transformers model and its tokenizer: mlflow.transformers.load_model gives a pipeline
            log_text_model(model, name=name, model_id=logged.model_id, run_id=self.run_id, uri=self.uri,
                           requirements=requirements)
            return logged.model_id
        # quiet: the pickle-format caution (said in the docstring above)
        with fluent_store(self.uri), quiet_logger("mlflow.pytorch", logging.ERROR):
            mlflow.pytorch.log_model(model, name=name, model_id=logged.model_id, run_id=self.run_id,
                                     input_example=example.numpy(), signature=signature,
                                     serialization_format="pickle", pip_requirements=requirements)
        return logged.model_id

    def _register(self, name: str, model_id: str, run) -> None:
        """One registry version per run, pointing at its logged model (``source`` ``models:/<id>``), and the
        logged model's ``mlflow.modelVersions`` tag naming it back (what ``mlflow.register_model`` writes;
        the UI's "Registered models" column reads it)."""
        versions = self.client.search_model_versions(f"name = '{name}' and run_id = '{self.run_id}'")
        if not versions:
            try:
                job = run.data.tags.get("kdray.job")
                self.client.create_registered_model(name, description=f"kdray job {job}: one version per trained "
                                                                      f"{name.removeprefix(f'{job}-')} model")
            except MlflowException as err:
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            with fluent_store(self.uri):  # the registry resolves ``models:/<id>`` through the process's store
                versions = [self.client.create_model_version(
                    name, f"models:/{model_id}", run_id=self.run_id, model_id=model_id,
                    tags={"kdray.stage": run.info.run_name, "kdray.job": run.data.tags.get("kdray.job", "")})]
        linked = json.loads(self.client.get_logged_model(model_id).tags.get(MODEL_VERSIONS_TAG, "[]"))
        wanted = linked + [{"name": v.name, "version": v.version} for v in versions
                           if {"name": v.name, "version": v.version} not in linked]
        if wanted != linked:
            self.client.set_logged_model_tags(model_id, {MODEL_VERSIONS_TAG: json.dumps(wanted)})


def download_model(uri: str, tracking_uri: str) -> tuple[dict, dict]:
    """Read a model logged by :class:`StageLogger` from ``runs:/<run_id>/model``: (spec, state_dict).
    The weights are read as tensors only (``read_weights``): an artifact holding pickled objects is refused."""
    import mlflow

    from kdray.orchestrator.weights import read_weights

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
