"""Faults injected for real: a Ray Train worker SIGKILLed mid-run, the driver SIGKILLed and resumed, SIGINT
(Ctrl-C), a NaN loss, a metrics write lost after its checkpoint, a checkpoint lost after its metrics write.
Whatever happens, the MLflow record ends FINISHED, or FAILED/KILLED with ``kdray.failure_reason``: never a
dangling RUNNING run, and each epoch is in a stage's metric history exactly once."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

import kdray
from jobs import digits_job
from jobs import drive_cli as _drive_cli
from kdray.orchestrator import stale_runs
from kdray.orchestrator.cli import main as cli_main
from kdray.orchestrator.tracking import FAILURE_TAG, StageLogger

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCH_KEYS = ("train_loss", "val_top1", "lr")


def job_runs(client: MlflowClient) -> list:
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exp_ids, "tags.`kdray.role` = 'job'")


def stage_runs(client: MlflowClient, parent) -> dict:
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return {r.info.run_name: r for r in runs}


def assert_each_epoch_once(client: MlflowClient, run_id: str, epochs: int) -> None:
    for key in EPOCH_KEYS:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == list(range(epochs)), (key, sorted(steps))
    assert len(client.get_metric_history(run_id, "test_top1")) == 1


pytestmark = pytest.mark.usefixtures("one_thread")


# --- a Ray Train worker killed mid-run ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.ray
def test_killed_worker_resumes_from_last_checkpoint(tmp_path, ray_session, mlflow_uri, capfd):
    from ray.util.state import list_actors

    epochs = 15
    every = 5
    common = dict(name="worker-kill", teacher__train__epochs=epochs, train__epochs=epochs,
                  checkpoint__every_epochs=every)
    reference = kdray.distill(digits_job(tmp_path / "reference", None, **common))  # uninterrupted, in-process
    run_dir = tmp_path / "runs" / "worker-kill"
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    killed: dict = {}
    done = threading.Event()
    gcs = ray_session.get_runtime_context().gcs_address  # this session's Ray, not another on the machine

    def teacher_epochs_in_mlflow() -> int:
        try:
            with open(run_dir / "mlflow_runs.json") as fh:
                run_id = json.load(fh)["stages"]["teacher"]
            return len(MlflowClient(mlflow_uri).get_metric_history(run_id, "val_top1"))
        except Exception:  # noqa: BLE001  (not created yet)
            return 0

    def kill_a_worker_after_first_checkpoint():
        # Aim at the window Ray Train leaves open: rank 0 has written the metrics of its second checkpoint,
        # which the controller (polling every 2 s) has not registered yet, so the restart replays them.
        deadline = time.monotonic() + 240
        while not done.is_set() and time.monotonic() < deadline:
            try:  # written by the Train controller once a checkpoint is registered
                latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]
            except (OSError, ValueError, KeyError, TypeError):
                latest = None
            logged = teacher_epochs_in_mlflow() if latest else 0
            if latest and (logged >= 2 * every or latest.get("epoch") != every - 1):
                workers = list_actors(address=gcs, filters=[("class_name", "=", "RayTrainWorker"),
                                                            ("state", "=", "ALIVE")])
                if len(workers) == 2:
                    os.kill(workers[0].pid, signal.SIGKILL)
                    killed.update(pid=workers[0].pid, checkpoint=latest, logged=logged)
                    return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_a_worker_after_first_checkpoint, daemon=True)
    killer.start()
    try:
        result = kdray.distill(digits_job(tmp_path, mlflow_uri, ray__num_workers=2, ray__max_failures=2, **common))
    finally:
        done.set()
        killer.join(10)
    assert killed, "no worker was killed"
    with pytest.raises(ProcessLookupError):
        os.kill(killed["pid"], 0)
    output = "".join(capfd.readouterr())
    if "epoch" in killed["checkpoint"]:
        # a mid-stage checkpoint: the stage picks up after it (or after the next, if that got registered
        # between reading the snapshot and the kill)
        stage, epoch = killed["checkpoint"]["stage"], int(killed["checkpoint"]["epoch"]) + 1
        resumed = re.findall(rf"\[{re.escape(stage)}\] resumed at epoch (\d+)", output)
        assert resumed and int(resumed[0]) in (epoch, epoch + every), (killed, output[-4000:])
    for kind in ("teacher", "distill"):  # within the uninterrupted run's band
        assert abs(result.accuracies(kind)[0] - reference.accuracies(kind)[0]) <= 0.05, kind
    assert result.accuracies("distill")[0] > 0.8

    client = MlflowClient(mlflow_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and FAILURE_TAG not in parent.data.tags
    stages = stage_runs(client, parent)
    assert set(stages) == {"teacher", "kd-seed0"}
    for run in stages.values():
        assert run.info.status == "FINISHED"
        assert_each_epoch_once(client, run.info.run_id, epochs)


# --- the driver killed outright, then --resume; stale runs -------------------------------------------


@pytest.mark.slow
def test_killed_driver_is_stale_then_resumes_into_the_same_run(tmp_path, mlflow_uri):
    epochs = 10  # the kill lands at the first checkpoint (after 2 of the teacher's 10 epochs): 18 still to go
    job = digits_job(tmp_path, mlflow_uri, name="driver-kill", teacher__train__epochs=epochs, train__epochs=epochs,
                     checkpoint__every_epochs=2)
    run_dir = tmp_path / "runs" / "driver-kill"
    proc, _ = _drive_cli(tmp_path, job, signal_when=run_dir / "checkpoint" / "state.pt", send=signal.SIGKILL,
                         wait_s=30)
    assert proc.returncode == -signal.SIGKILL

    client = MlflowClient(mlflow_uri)
    [parent] = job_runs(client)
    assert parent.info.status == "RUNNING"  # nobody could close it ...
    assert parent.data.tags["kdray.driver_pid"] == str(proc.pid)
    assert parent.data.tags["kdray.driver_host"] == socket.gethostname()
    assert [r.run_id for r in stale_runs.stale_runs(client)] == [parent.info.run_id]  # ... but it is stale
    assert cli_main(["runs", "--stale", "--close", "--store", mlflow_uri]) == 0
    closed = client.get_run(parent.info.run_id)
    assert closed.info.status == "FAILED" and closed.data.tags[FAILURE_TAG] == stale_runs.STALE_REASON
    assert all(r.info.status in ("FAILED", "FINISHED") for r in stage_runs(client, parent).values())
    assert stale_runs.stale_runs(client) == []

    proc, output = _drive_cli(tmp_path, job, "--resume", log_name="resume.log", wait_s=180)
    assert proc.returncode == 0, output[-3000:]
    assert "resumed at epoch" in output
    [resumed] = job_runs(client)  # one job run: the same one, reopened
    assert resumed.info.run_id == parent.info.run_id
    assert resumed.info.status == "FINISHED" and FAILURE_TAG not in resumed.data.tags
    assert resumed.data.tags["kdray.driver_pid"] == str(proc.pid) and "kdray.resumed_at" in resumed.data.tags
    stages = stage_runs(client, resumed)
    assert set(stages) == {"teacher", "kd-seed0"}
    for run in stages.values():
        assert run.info.status == "FINISHED" and FAILURE_TAG not in run.data.tags
        assert_each_epoch_once(client, run.info.run_id, epochs)


def test_stale_runs_only_local_dead_drivers(tmp_path, mlflow_uri):
    client = MlflowClient(mlflow_uri)
    exp = client.create_experiment("stale")
    host = socket.gethostname()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, timeout=30)
    dead_pid = gone.stdout.strip()
    me_started_ms = int(stale_runs.process_start_s(os.getpid())[0] * 1000)

    def job(name, pid, host, status="RUNNING", start_time=None):
        run = client.create_run(exp, run_name=name, start_time=start_time, tags={
            "kdray.role": "job", "kdray.driver_pid": str(pid), "kdray.driver_host": host})
        if status != "RUNNING":
            client.set_terminated(run.info.run_id, status)
        return run.info.run_id

    dead = job("dead", dead_pid, host)
    child = client.create_run(exp, run_name="stage", tags={"mlflow.parentRunId": dead}).info.run_id
    job("alive", os.getpid(), host)
    job("other-host", dead_pid, host + "-elsewhere")
    job("finished", dead_pid, host, status="FINISHED")
    reused = job("pid-reused", os.getpid(), host, start_time=me_started_ms - 3_600_000)  # run older than this pid
    assert {r.name for r in stale_runs.stale_runs(client)} == {"dead", "pid-reused"}
    assert cli_main(["runs", "--stale", "--store", mlflow_uri]) == 0  # lists, closes nothing
    assert client.get_run(dead).info.status == "RUNNING"
    assert cli_main(["runs", "--stale", "--close", "--store", mlflow_uri, "--experiment", "stale"]) == 0
    for run_id in (dead, child, reused):
        run = client.get_run(run_id)
        assert run.info.status == "FAILED" and run.data.tags[FAILURE_TAG] == "driver gone"
    assert {r.name: r.status for r in stale_runs.job_runs(client)}["alive"] == "RUNNING"
    assert stale_runs.stale_runs(client) == []


# --- Ctrl-C ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_exits_130_and_marks_the_run_killed(tmp_path, mlflow_uri):
    job = digits_job(tmp_path, mlflow_uri, name="ctrl-c", teacher__train__epochs=60, train__epochs=60,
                     checkpoint__every_epochs=1)
    proc, output = _drive_cli(tmp_path, job, signal_when=tmp_path / "runs" / "ctrl-c" / "checkpoint" / "state.pt",
                              wait_s=60)
    assert proc.returncode == 130, output[-3000:]
    assert "kdray: interrupted" in output
    client = MlflowClient(mlflow_uri)
    [parent] = job_runs(client)
    assert parent.info.status == "KILLED"
    assert parent.data.tags[FAILURE_TAG].startswith("KeyboardInterrupt")
    stages = stage_runs(client, parent)
    assert stages["teacher"].info.status == "KILLED" and FAILURE_TAG in stages["teacher"].data.tags
    assert all(r.info.status != "RUNNING" for r in stages.values())


@pytest.mark.slow
@pytest.mark.ray
def test_ctrl_c_on_a_ray_train_job_is_killed_not_failed_and_resumes(tmp_path, ray_session, mlflow_uri):
    """Ray Train answers Ctrl-C by aborting its run, then raises SystemExit(1) in the driver: kdray reports
    it as an interruption (exit 130, runs KILLED) and ``--resume`` finishes the same job run."""
    epochs = 6
    job = digits_job(tmp_path, mlflow_uri, name="ctrl-c-ray", teacher__train__epochs=epochs, train__epochs=epochs,
                     checkpoint__every_epochs=2, ray__num_workers=2)
    address = ray_session.get_runtime_context().gcs_address  # this session's Ray: no start-up per driver
    snapshot = tmp_path / "runs" / "ctrl-c-ray" / "checkpoint_manager_snapshot.json"  # the first Train checkpoint
    proc, output = _drive_cli(tmp_path, job, signal_when=snapshot, appear_timeout_s=240, wait_s=120,
                              ray_address=address)
    assert proc.returncode == 130, output[-3000:]
    assert "kdray: interrupted (Ctrl-C: Ray Train stopped the run; `--resume`" in output
    client = MlflowClient(mlflow_uri)
    [parent] = job_runs(client)
    assert parent.info.status == "KILLED" and parent.data.tags[FAILURE_TAG].startswith("KeyboardInterrupt")
    assert all(r.info.status != "RUNNING" for r in stage_runs(client, parent).values())

    proc, output = _drive_cli(tmp_path, job, "--resume", log_name="resume.log", wait_s=240, ray_address=address)
    assert proc.returncode == 0, output[-3000:]
    [resumed] = job_runs(client)
    assert resumed.info.run_id == parent.info.run_id and resumed.info.status == "FINISHED"
    for run in stage_runs(client, resumed).values():
        assert run.info.status == "FINISHED" and FAILURE_TAG not in run.data.tags
        assert_each_epoch_once(client, run.info.run_id, epochs)


def test_ctrl_c_waits_for_the_tracking_write_then_stops(tmp_path, mlflow_uri):
    """Ctrl-C arriving inside an MLflow write: the write completes, then KeyboardInterrupt, and the runs can
    still be marked KILLED. Raised mid-write, it once left SQLite locked and the driver hung marking them."""
    client = MlflowClient(mlflow_uri)
    run_id = client.create_run(client.create_experiment("ctrl-c-write")).info.run_id
    logger = StageLogger(mlflow_uri, run_id)
    real_log_batch, calls = logger.client.log_batch, []

    def log_batch_hit_by_ctrl_c(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # delivered to Python at the next bytecode: in the middle of the write
        calls.append("after the signal")
        return real_log_batch(*args, **kwargs)

    logger.client.log_batch = log_batch_hit_by_ctrl_c
    logger.buffer(0, {"val_top1": 0.5})
    with pytest.raises(KeyboardInterrupt):
        logger.flush()
    assert calls == ["after the signal"]
    assert [m.value for m in client.get_metric_history(run_id, "val_top1")] == [0.5]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the guard put Python's handler back
    client.set_terminated(run_id, "KILLED")  # the store is not left locked
    assert client.get_run(run_id).info.status == "KILLED"


def test_a_second_ctrl_c_during_a_write_stops_at_once():
    from kdray.orchestrator.interrupts import sigint_held

    reached = []
    with pytest.raises(KeyboardInterrupt):
        with sigint_held():
            os.kill(os.getpid(), signal.SIGINT)
            reached.append("held")
            os.kill(os.getpid(), signal.SIGINT)
            reached.append("not reached")
    assert reached == ["held"]
    errors = []

    def off_main_thread():  # only the main thread owns signal handlers: elsewhere the guard is a no-op
        try:
            with sigint_held():
                errors.append(None)
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    worker = threading.Thread(target=off_main_thread)
    worker.start()
    worker.join()
    assert errors == [None]


# --- NaN ---------------------------------------------------------------------------------------------


def test_nan_loss_fails_the_run_naming_step_and_term(tmp_path, mlflow_uri, capsys):
    job = digits_job(tmp_path, mlflow_uri, name="nan", teacher__train__epochs=2, train__epochs=2, train__lr=1e6)
    path = tmp_path / "nan.yaml"
    path.write_text(yaml.safe_dump(job))
    assert cli_main(["run", str(path)]) == 2  # a user error: one line, exit code 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    kdray_lines = [line for line in err.splitlines() if line.startswith("kdray:")]
    assert len(kdray_lines) == 1, err
    assert re.match(r"kdray: error: non-finite loss at epoch \d+ step \d+: term\(s\) \[", kdray_lines[0]), err
    assert re.search(r"'(ce|kd)'", kdray_lines[0])

    client = MlflowClient(mlflow_uri)
    [parent] = job_runs(client)
    assert parent.info.status == "FAILED"
    reason = parent.data.tags[FAILURE_TAG]
    assert reason.startswith("NonFiniteLossError: non-finite loss at epoch") and "step" in reason
    stages = stage_runs(client, parent)
    assert stages["teacher"].info.status == "FINISHED"  # the stage before the NaN is kept
    assert stages["kd-seed0"].info.status == "FAILED" and stages["kd-seed0"].data.tags[FAILURE_TAG] == reason


# --- the metrics/checkpoint ordering, exactly once ----------------------------------------------------


def test_metrics_write_lost_after_its_checkpoint_is_recovered(tmp_path, mlflow_uri, monkeypatch):
    """Crash between a checkpoint and the metrics write it covers: the metrics ride in the checkpoint."""
    epochs = 6
    cfg = digits_job(tmp_path, mlflow_uri, name="lost-write", teacher__train__epochs=epochs, train__epochs=epochs,
                     checkpoint__every_epochs=2)
    flush, calls = StageLogger.flush, []

    def flush_then_die(self):
        calls.append(1)
        if len(calls) == 2:  # the write after the teacher's epoch-4 checkpoint
            raise ConnectionError("tracking server went away")
        flush(self)

    monkeypatch.setattr(StageLogger, "flush", flush_then_die)
    with pytest.raises(ConnectionError):
        kdray.distill(cfg)
    monkeypatch.setattr(StageLogger, "flush", flush)
    client = MlflowClient(mlflow_uri)
    [parent] = job_runs(client)
    assert parent.info.status == "FAILED" and "tracking server went away" in parent.data.tags[FAILURE_TAG]

    result = kdray.distill(cfg, resume=True)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and FAILURE_TAG not in parent.data.tags
    for run in stage_runs(client, parent).values():
        assert run.info.status == "FINISHED"
        assert_each_epoch_once(client, run.info.run_id, epochs)


def test_checkpoint_lost_after_its_metrics_write_is_not_logged_twice(tmp_path, mlflow_uri, monkeypatch):
    """Ray Train registers a checkpoint after the worker's report returned: a restart may replay epochs whose
    metrics were written. Simulated here: the epoch-4 checkpoint is lost, the job dies at the stage end."""
    from kdray.orchestrator.checkpoints import LocalCheckpoints

    epochs = 6
    cfg = digits_job(tmp_path, mlflow_uri, name="lost-ckpt", teacher__train__epochs=epochs, train__epochs=epochs,
                     checkpoint__every_epochs=2)
    save, calls = LocalCheckpoints.save, []

    def lossy_save(self, payload, metrics):
        calls.append(1)
        if len(calls) == 2:
            return  # never persisted
        if len(calls) == 3:
            raise OSError("node lost")  # the teacher's stage-end checkpoint
        save(self, payload, metrics)

    monkeypatch.setattr(LocalCheckpoints, "save", lossy_save)
    with pytest.raises(OSError):
        kdray.distill(cfg)
    monkeypatch.setattr(LocalCheckpoints, "save", save)
    result = kdray.distill(cfg, resume=True)  # replays teacher epochs 2..5 from the epoch-2 checkpoint
    client = MlflowClient(mlflow_uri)
    for run in stage_runs(client, client.get_run(result.parent_run_id)).values():
        assert run.info.status == "FINISHED"
        assert_each_epoch_once(client, run.info.run_id, epochs)


# --- safety ------------------------------------------------------------------------------------------


def test_every_torch_load_is_weights_only():
    import ast

    calls = []
    for folder, _, files in os.walk(os.path.join(ROOT, "kdray")):
        for name in (n for n in files if n.endswith(".py")):
            path = os.path.join(folder, name)
            for node in ast.walk(ast.parse(open(path).read(), path)):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                    safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                               for k in node.keywords)
                    calls.append((f"{os.path.relpath(path, ROOT)}:{node.lineno}", safe))
    assert calls
    assert all(safe for _, safe in calls), [where for where, safe in calls if not safe]


class Opaque:
    """Not tensors or containers: unpickling it could run arbitrary code."""


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    from kdray.orchestrator.checkpoints import LocalCheckpoints

    path = tmp_path / "checkpoint" / "state.pt"
    path.parent.mkdir()
    torch.save({"done": {}, "evil": Opaque()}, path)
    with pytest.raises(Exception, match="[Ww]eights only"):
        LocalCheckpoints(str(tmp_path)).latest()


def test_output_dir_is_resolved_and_checked_before_anything_runs(tmp_path, monkeypatch):
    from kdray.config import ConfigError, load_config

    monkeypatch.chdir(tmp_path)
    assert load_config(digits_job(tmp_path, None, output_dir="rel/runs")).run_dir() == str(tmp_path / "rel" / "runs" / "t")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match=r"^output_dir: cannot write .*a-file.* is not a writable directory"):
        kdray.distill(digits_job(tmp_path, None, output_dir=str(tmp_path / "a-file" / "runs")))
