"""A remote MLflow tracking server: a 2-worker Ray job logs into it over HTTP (params, metrics, proxied
artifacts), and an unreachable server stops a job before training with a one-line error."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml
from mlflow.tracking import MlflowClient

import kdray
from jobs import digits_job

SERVER_START_TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` on 127.0.0.1 and a free port: SQLite backend, artifacts proxied to a tmp folder."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    artifacts = tmp_path / "server-artifacts"
    log = open(tmp_path / "mlflow-server.log", "w")
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
           "--serve-artifacts", "--artifacts-destination", str(artifacts)]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=env,
                            start_new_session=True)  # its own process group: the server and its workers
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail("mlflow server did not start:\n" + (tmp_path / "mlflow-server.log").read_text()[-3000:])
            time.sleep(0.25)
        yield url, artifacts
    finally:
        # the whole process group: the server, its uvicorn workers and its job consumers (huey), which
        # outlive the server when only it is stopped
        for sig, wait_s in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                pass
        log.close()


@pytest.mark.slow
@pytest.mark.ray
def test_two_worker_job_logs_to_a_tracking_server(tmp_path, ray_session, mlflow_server):
    url, artifacts = mlflow_server
    epochs = 3
    result = kdray.distill(digits_job(tmp_path, url, name="remote", ray__num_workers=2, teacher__train__epochs=epochs,
                                      train__epochs=epochs, checkpoint__every_epochs=2))
    assert result.tracking_uri == url

    client = MlflowClient(url)  # everything below is read back over HTTP
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["ray.num_workers"] == "2" and parent.data.params["student.model"] == "digits_mlp"
    assert parent.data.tags["kdray.driver_pid"] == str(os.getpid())
    assert parent.data.tags["kdray.driver_host"] == socket.gethostname()
    assert "distill_test_top1_mean" in parent.data.metrics
    assert {"config.json", "results.md", "test_accuracy.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}

    stages = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert {s.info.run_name: s.info.status for s in stages} == {"teacher": "FINISHED", "kd-seed0": "FINISHED"}
    kd = next(s for s in stages if s.info.run_name == "kd-seed0")
    for key in ("train_loss", "train_kd", "val_top1", "lr"):  # logged by rank 0 on a Ray worker
        assert sorted(m.step for m in client.get_metric_history(kd.info.run_id, key)) == list(range(epochs)), key
    assert kd.data.metrics["test_top1"] == pytest.approx(result.accuracies("distill")[0])
    files = {a.path for a in client.list_artifacts(kd.info.run_id, "model")}
    assert {"model/state_dict.pt", "model/model_spec.json"} <= files
    local = client.download_artifacts(kd.info.run_id, "model/state_dict.pt", str(tmp_path))
    import torch

    state = torch.load(local, map_location="cpu", weights_only=True)
    assert "fc.weight" in state
    # the artifacts went through the server's proxy into its artifact destination
    stored = [os.path.join(d, f) for d, _, fs in os.walk(artifacts) for f in fs]
    assert any(p.endswith(os.path.join("model", "state_dict.pt")) for p in stored)


def _dead_url() -> str:
    return f"http://127.0.0.1:{_free_port()}"  # nothing listens there once the probe socket is closed


def test_unreachable_server_fails_before_training(tmp_path):
    url = _dead_url()
    start = time.monotonic()
    with pytest.raises(ConnectionError) as err:
        kdray.distill(digits_job(tmp_path, url, name="unreachable"))
    message = str(err.value)
    assert "\n" not in message and url in message and "unreachable" in message
    assert time.monotonic() - start < 30
    assert not (tmp_path / "runs" / "unreachable").exists()  # nothing trained, nothing written


@pytest.mark.slow
def test_unreachable_server_cli_exit_code_and_one_line(tmp_path):
    url = _dead_url()
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(digits_job(tmp_path, None, name="cli-unreachable")))
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "kdray.orchestrator.cli", "run", str(job), "mlflow.enabled=true"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("kdray: error: MLflow tracking server " + url) and "unreachable" in lines[0]
    assert "epoch" not in done.stdout
    assert not (tmp_path / "runs" / "cli-unreachable").exists()


def test_ui_on_a_server_prints_its_url_and_starts_nothing(capsys, monkeypatch):
    from kdray.orchestrator import cli

    def no_server(*args, **kwargs):
        raise AssertionError(f"kdray ui started a process: {args}")

    monkeypatch.setattr(subprocess, "call", no_server)
    monkeypatch.setattr(subprocess, "Popen", no_server)
    assert cli.main(["ui", "--store", "http://x"]) == 0
    assert capsys.readouterr().out.strip() == "MLflow UI: http://x"
