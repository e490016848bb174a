"""`ray job submit --working-dir DIR -- kdray run job.yaml` against a real Ray head started with `ray start`
(the ``ray_head`` fixture, tests/ray_cluster.py)."""
from __future__ import annotations

import json
import os
import subprocess
import uuid

import pytest
import yaml
from mlflow.tracking import MlflowClient

from jobs import digits_job
from ray_cluster import JOB_TIMEOUT_S, ray_cli

pytestmark = [pytest.mark.slow, pytest.mark.ray]  # a real `ray start` head


def test_ray_job_submit_runs_kdray_on_a_real_head(ray_head, tmp_path):
    address, temp_dir = ray_head
    workdir = tmp_path / "working_dir"
    workdir.mkdir()
    db = tmp_path / "mlflow.db"
    job = digits_job(tmp_path, None, name="submitted", ray__num_workers=1, teacher__train__epochs=3,
                     train__epochs=3, checkpoint__every_epochs=3)
    job["mlflow"] = {"experiment": "submitted"}  # the tracking URI comes from the job's environment
    (workdir / "job.yaml").write_text(yaml.safe_dump(job))
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": f"sqlite:///{db}", "RAY_AUTH_MODE": "disabled",
                                "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0"}}
    submission_id = f"kdray-test-{uuid.uuid4().hex[:8]}"
    try:
        submitted = ray_cli("job", "submit", "--address", address, "--submission-id", submission_id,
                             "--working-dir", str(workdir), "--runtime-env-json", json.dumps(runtime_env),
                             "--", "kdray", "run", "job.yaml", timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        ray_cli("job", "stop", "--address", address, "--no-wait", submission_id)
        logs = ray_cli("job", "logs", "--address", address, submission_id).stdout
        pytest.fail(f"job did not finish in {JOB_TIMEOUT_S}s; logs:\n{logs[-4000:]}")
    logs = submitted.stdout  # `ray job submit` without --no-wait tails the job's logs until it ends
    status = ray_cli("job", "status", "--address", address, submission_id)
    assert f"Job '{submission_id}' succeeded" in status.stdout + status.stderr, (
        status.stdout[-2000:], submitted.stderr[-3000:], logs[-4000:])
    assert submitted.returncode == 0
    assert "kd-seed0" in logs and f"MLflow: sqlite:///{db}" in logs

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("submitted")
    runs = client.search_runs([exp.experiment_id], "tags.`kdray.role` = 'job'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["kdray.run_dir"] == str(tmp_path / "runs" / "submitted")
    stages = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{runs[0].info.run_id}'")
    assert {s.info.run_name: s.info.status for s in stages} == {"teacher": "FINISHED", "kd-seed0": "FINISHED"}
    # the Train worker ran on that head (the job's driver joined it through RAY_ADDRESS), not on a Ray of its own
    logs_dir = os.path.join(temp_dir, "session_latest", "logs")
    worker_logs = [n for n in os.listdir(logs_dir) if n.startswith("worker-") and n.endswith(".out")]
    assert any("[teacher] epoch 1/3" in open(os.path.join(logs_dir, n), errors="replace").read()
               for n in worker_logs)
