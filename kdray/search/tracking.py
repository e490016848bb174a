"""MLflow for a sweep: one parent run (created, or reopened after a killed driver), every trial's job run
nested under it (``mlflow.parentRunId``), the outcome and figures on the parent, the best student in
the model registry.

The parent's id is kept in ``<sweep dir>/sweep.json``; a parent created just before the driver died
(before that file was written) is found again by its ``kdray.sweep_dir`` tag, so a resumed sweep never
gets a second parent.
"""
from __future__ import annotations

import json
import os
import sys
import time

from kdray.orchestrator.interrupts import holds_sigint

SWEEP_ROLE = "sweep"
STORE_RETRY_S = 30.0  # how long closing the runs of an interrupted sweep waits for a busy store


class SweepTracking:
    def __init__(self, uri: str, experiment: str, sweep_dir: str, name: str):
        from kdray.orchestrator.tracking import experiment_id, mark_training_experiment, open_client

        self.uri, self.sweep_dir, self.name = uri, sweep_dir, name
        self.client = open_client(uri)  # creates a new local store safely when two commands start at once
        self.experiment_id = experiment_id(self.client, experiment, uri)
        mark_training_experiment(self.client, self.experiment_id)  # the UI opens it on its training runs
        self.parent_id: str | None = None

    # --- the parent run ----------------------------------------------------------------------
    @holds_sigint
    def start(self, saved_id: str | None, params: dict[str, str], texts: dict[str, str], resume: bool) -> str:
        """Reopen ``saved_id`` (or, resuming, a RUNNING parent left for this directory) or create the parent."""
        from mlflow.entities import Param

        run_id = saved_id or (self._find_parent() if resume else None)
        if run_id is not None:
            self.parent_id = run_id
            if self.client.get_run(run_id).info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, "kdray.resumed_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=self.name, tags={
            "kdray.role": SWEEP_ROLE, "kdray.sweep_dir": self.sweep_dir, "kdray.job": self.name})
        self.parent_id = run.info.run_id
        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.parent_id, params=items[i:i + 100])
        for name, text in texts.items():
            self.client.log_text(self.parent_id, text, name)
        return self.parent_id

    def _find_parent(self) -> str | None:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`kdray.sweep_dir` = '{self.sweep_dir}' and tags.`kdray.role` = '{SWEEP_ROLE}' "
                          f"and attributes.status = 'RUNNING'",
            order_by=["attributes.start_time DESC"], max_results=5)
        return runs[0].info.run_id if runs else None

    def child_runs(self) -> list:
        return self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_id}'",
            max_results=5000)

    def trial_runs(self) -> dict[str, list]:
        """Job runs of trials under the parent, grouped by trial name."""
        out: dict[str, list] = {}
        for run in self.child_runs():
            job = run.data.tags.get("kdray.job", "")
            if job.startswith("trial-"):
                out.setdefault(job, []).append(run)
        return out

    @holds_sigint
    def reconcile(self, keep: dict[str, str | None]) -> list[str]:
        """Keep one run per trial Tune knows (``keep``: trial name -> its job run id); delete the rest:
        runs of trials Tune never recorded (started just before a driver died) and duplicates. Returns the
        deleted run ids."""
        deleted = []
        for job, runs in self.trial_runs().items():
            wanted = keep.get(job)
            for run in runs:
                if job in keep and (wanted is None or run.info.run_id == wanted):
                    if wanted is None:
                        wanted = run.info.run_id
                    continue
                self._delete_tree(run.info.run_id)
                deleted.append(run.info.run_id)
        return deleted

    def _delete_tree(self, run_id: str) -> None:
        for child in self.client.search_runs([self.experiment_id],
                                             filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'"):
            self._delete_tree(child.info.run_id)
        self.client.set_tag(run_id, "kdray.deleted_reason", "trial not recorded by Tune (driver interrupted)")
        if self.client.get_run(run_id).info.status == "RUNNING":
            self.client.set_terminated(run_id, "KILLED")
        self.client.delete_run(run_id)

    @holds_sigint
    def tag_trial(self, run_id: str, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, str(v))

    # --- outcome -----------------------------------------------------------------------------
    @holds_sigint
    def log_outcome(self, metrics: dict[str, float], params: dict[str, str], texts: dict[str, str],
                    figures: dict) -> None:
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None]
        for i in range(0, len(ms), 500):
            self.client.log_batch(self.parent_id, metrics=ms[i:i + 500])
        existing = self.client.get_run(self.parent_id).data.params
        items = [Param(k, v[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.parent_id, params=items[i:i + 100])
        for name, text in texts.items():
            self.client.log_text(self.parent_id, text, name)
        for name, fig in figures.items():
            self.client.log_figure(self.parent_id, fig, name)

    @holds_sigint
    def register(self, model, model_name: str, source_run: str, description: str) -> dict:
        """Log the best student (an ``nn.Module``, pickled so it loads as itself) on the parent and register
        it; the new version gets the alias ``champion``."""
        import logging

        import mlflow

        from kdray.orchestrator.mlflow_internals import fluent_store, quiet_logger

        # quiet: the pickle-format caution (these are the user's own modules)
        with fluent_store(self.uri), quiet_logger("mlflow.pytorch", logging.ERROR):
            with mlflow.start_run(run_id=self.parent_id):
                info = mlflow.pytorch.log_model(model, name="best_student", serialization_format="pickle",
                                                registered_model_name=model_name)
        version = str(info.registered_model_version)
        self.client.update_run(self.parent_id, status="RUNNING")  # start_run's exit closed it
        self.client.set_registered_model_alias(model_name, "champion", version)
        self.client.update_model_version(model_name, version, description=description)
        self.client.set_model_version_tag(model_name, version, "kdray.source_run", source_run)
        self.client.set_model_version_tag(model_name, version, "kdray.sweep_run", self.parent_id)
        return {"name": model_name, "version": version, "uri": f"models:/{model_name}/{version}"}

    @holds_sigint
    def finish(self) -> None:
        self.client.set_terminated(self.parent_id, "FINISHED")

    @holds_sigint
    def fail(self, error: BaseException) -> None:
        """Mark the parent (first: it is what the user looks for) and the runs left RUNNING below it KILLED
        (interrupted) or FAILED. Trials stopped with the driver cannot close their own runs (Tune ends their
        actors), and one of them may still hold a SQLite store's write lock for a moment: each write is
        retried for up to ``STORE_RETRY_S`` before a one-line warning says which run stays RUNNING."""
        if self.parent_id is None:
            return
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        reason = f"{type(error).__name__}: {error}"[:5000]
        if not self._retried(lambda: self._close(self.parent_id, status, reason), self.parent_id):
            return
        below = self._retried(lambda: self._running_below(self.parent_id), self.parent_id) or []
        for run_id in below:
            self._retried(lambda: self._close(run_id, status, reason), run_id)

    def _close(self, run_id: str, status: str, reason: str) -> bool:
        if self.client.get_run(run_id).info.status == "RUNNING":
            self.client.set_tag(run_id, "kdray.failure_reason", reason)
            self.client.set_terminated(run_id, status)
        return True

    def _retried(self, write, run_id: str):
        deadline = time.monotonic() + STORE_RETRY_S
        while True:
            try:
                return write()
            except Exception as err:  # noqa: BLE001  (a locked SQLite store, a store going away)
                if time.monotonic() > deadline:
                    print(f"kdray: warning: could not close MLflow run {run_id} ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200]}); `kdray sweep FILE --resume` reopens it",
                          file=sys.stderr)
                    return None
                time.sleep(0.5)

    def _running_below(self, run_id: str) -> list[str]:
        """RUNNING runs nested under ``run_id``: trials' job runs and their stage runs (``--resume`` reopens them)."""
        out, parents = [], [run_id]
        while parents:
            for run in self.client.search_runs([self.experiment_id], f"tags.`mlflow.parentRunId` = '{parents.pop()}'"):
                parents.append(run.info.run_id)
                out += [run.info.run_id] if run.info.status == "RUNNING" else []
        return out


def read_state(path: str) -> dict:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def write_state(path: str, state: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(state, fh, indent=2, default=str)
    os.replace(tmp, path)
