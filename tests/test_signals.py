"""SIGTERM, what `ray job stop`, Kubernetes and batch schedulers send, is a stop on purpose like Ctrl-C: every
run KILLED with the reason, exit 143, one line on stderr, and ``--resume`` finishes the job. And a job asking
for more workers than the cluster can give fails in bounded time, in one line, instead of waiting forever."""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import yaml
from mlflow.tracking import MlflowClient

import kdray
from jobs import cli_env, digits_job, drive_cli
from kdray.config import ConfigError
from kdray.orchestrator.interrupts import Terminated, sigint_held, sigterm_handled
from kdray.orchestrator.tracking import FAILURE_TAG

TERMINATED_LINE = "kdray: interrupted (SIGTERM"


def all_runs(uri: str) -> list:
    client = MlflowClient(uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def assert_all_killed_by_sigterm(uri: str, expected: set[str], may_finish: frozenset = frozenset()) -> None:
    """Every run in ``expected`` KILLED naming SIGTERM, none left RUNNING; a run in ``may_finish`` may instead
    have FINISHED cleanly (a stage that ended while the abort reached the workers)."""
    runs = {r.info.run_name: r for r in all_runs(uri)}
    assert expected <= set(runs), sorted(runs)
    for name, run in runs.items():
        if name in may_finish and run.info.status == "FINISHED":
            assert FAILURE_TAG not in run.data.tags, name
        elif name in expected:
            assert run.info.status == "KILLED", (name, run.info.status, run.data.tags.get(FAILURE_TAG))
            assert "SIGTERM" in run.data.tags[FAILURE_TAG], (name, run.data.tags[FAILURE_TAG])
        assert run.info.status != "RUNNING", name


def assert_all_finished(uri: str) -> None:
    for run in all_runs(uri):
        assert run.info.status == "FINISHED" and FAILURE_TAG not in run.data.tags, (run.info.run_name,
                                                                                    run.info.status)


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and "mlflow.store.db.utils" not in line]
    assert len(lines) == 1, stderr[-3000:]  # MLflow's two "creating tables" INFO lines are not kdray's
    return lines[0]


# --- the guard, without a job -------------------------------------------------------------------------


def test_sigterm_during_a_tracking_write_waits_for_it_then_raises_terminated():
    reached, before = [], signal.getsignal(signal.SIGTERM)  # Ray's handler once the session's Ray has started
    with sigterm_handled():
        with pytest.raises(Terminated, match="SIGTERM"):
            with sigint_held():
                os.kill(os.getpid(), signal.SIGTERM)
                reached.append("the write went on")
        assert reached == ["the write went on"]
        with pytest.raises(Terminated):  # a second SIGTERM during the same write: at once
            with sigint_held():
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)
                reached.append("not reached")
    assert reached == ["the write went on"]
    assert signal.getsignal(signal.SIGTERM) is before  # put back after the CLI's block


# --- SIGTERM to `kdray run` ----------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_in_process_kills_every_run_exits_143_and_resumes(tmp_path, mlflow_uri):
    job = digits_job(tmp_path, mlflow_uri, name="term", teacher__train__epochs=30, train__epochs=2,
                     checkpoint__every_epochs=1)
    started = time.monotonic()
    proc, output = drive_cli(tmp_path, job, signal_when=tmp_path / "runs" / "term" / "checkpoint" / "state.pt",
                             send=signal.SIGTERM, wait_s=60, stderr_name="stderr.log")
    assert proc.returncode == 143, output[-3000:]
    line = one_line((tmp_path / "stderr.log").read_text())
    assert line.startswith(TERMINATED_LINE) and "--resume" in line, line
    assert_all_killed_by_sigterm(mlflow_uri, {"term", "teacher", "kd-seed0"})
    assert time.monotonic() - started < 60

    proc, output = drive_cli(tmp_path, job, "--resume", log_name="resume.log", wait_s=120)
    assert proc.returncode == 0, output[-3000:]
    assert "resumed at epoch" in output
    assert len([r for r in all_runs(mlflow_uri) if r.info.run_name == "term"]) == 1  # the same job run
    assert_all_finished(mlflow_uri)


@pytest.mark.slow
@pytest.mark.ray
def test_sigterm_on_ray_train_aborts_train_kills_the_runs_and_resumes(tmp_path, ray_session, mlflow_uri):
    """Was: exit 134 (SIGABRT) with Ray's C++ dump and the runs FAILED "SystemExit: 1"."""
    job = digits_job(tmp_path, mlflow_uri, name="term-ray", teacher__train__epochs=40, train__epochs=2,
                     checkpoint__every_epochs=2, ray__num_workers=1)
    address = ray_session.get_runtime_context().gcs_address  # the session's Ray: no start-up per driver
    snapshot = tmp_path / "runs" / "term-ray" / "checkpoint_manager_snapshot.json"  # the first Train checkpoint
    proc, output = drive_cli(tmp_path, job, signal_when=snapshot, send=signal.SIGTERM, appear_timeout_s=240,
                             wait_s=120, ray_address=address, stderr_name="stderr.log")
    stderr = (tmp_path / "stderr.log").read_text()
    assert proc.returncode == 143, output[-3000:] + stderr[-3000:]
    assert "SIGTERM: Ray Train stopped the run; `--resume`" in stderr
    assert "Aborted" not in stderr and "*** SIGTERM received" not in stderr and "Received SIGINT" not in stderr
    # Train registers a checkpoint after the worker reported it and aborts at the controller's next poll: the
    # teacher (signalled at its epoch 2 of 40) may end first on a fast machine; the student's stage cannot
    assert_all_killed_by_sigterm(mlflow_uri, {"term-ray", "teacher", "kd-seed0"}, may_finish=frozenset({"teacher"}))

    proc, output = drive_cli(tmp_path, job, "--resume", log_name="resume.log", wait_s=240, ray_address=address)
    assert proc.returncode == 0, output[-3000:]
    assert_all_finished(mlflow_uri)


@pytest.mark.slow
@pytest.mark.ray
def test_sigterm_with_stage_tasks_cancels_them_kills_the_runs_and_resumes(tmp_path, ray_session, mlflow_uri):
    job = digits_job(tmp_path, mlflow_uri, name="term-tasks", teacher__train__epochs=30, train__epochs=2,
                     checkpoint__every_epochs=1, ray={"num_workers": 1, "stage_tasks": True})
    address = ray_session.get_runtime_context().gcs_address
    first = tmp_path / "runs" / "term-tasks" / "stages" / "teacher" / "state.pt"  # the teacher task's checkpoint
    proc, output = drive_cli(tmp_path, job, signal_when=first, send=signal.SIGTERM, appear_timeout_s=240,
                             wait_s=120, ray_address=address, stderr_name="stderr.log")
    stderr = (tmp_path / "stderr.log").read_text()
    assert proc.returncode == 143, output[-3000:] + stderr[-3000:]
    assert TERMINATED_LINE in stderr
    assert_all_killed_by_sigterm(mlflow_uri, {"term-tasks", "teacher", "kd-seed0"})

    proc, output = drive_cli(tmp_path, job, "--resume", log_name="resume.log", wait_s=240, ray_address=address)
    assert proc.returncode == 0, output[-3000:]
    assert_all_finished(mlflow_uri)


@pytest.mark.slow
@pytest.mark.ray  # a real `ray start` head
def test_ray_job_stop_kills_the_runs_then_resume_finishes(ray_head, tmp_path):
    """`ray job stop` sends SIGTERM to the entry point, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (read by
    the job's supervisor actor, which gets the job's runtime_env env_vars)."""
    from ray_cluster import JOB_TIMEOUT_S, ray_cli

    address, _ = ray_head
    workdir = tmp_path / "working_dir"
    workdir.mkdir()
    db = tmp_path / "mlflow.db"
    job = digits_job(tmp_path, None, name="stopped", ray__num_workers=1, teacher__train__epochs=120,  # long enough that `ray job stop` lands mid-teacher
                     train__epochs=2, checkpoint__every_epochs=2)
    job["mlflow"] = {"experiment": "stopped"}
    (workdir / "job.yaml").write_text(yaml.safe_dump(job))
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": f"sqlite:///{db}", "RAY_AUTH_MODE": "disabled",
                                "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0", "RAY_JOB_STOP_WAIT_TIME_S": "30"}}
    submission_id = f"kdray-stop-{uuid.uuid4().hex[:8]}"
    submit = ["job", "submit", "--address", address, "--working-dir", str(workdir), "--runtime-env-json",
              json.dumps(runtime_env)]
    ray_cli(*submit, "--submission-id", submission_id, "--no-wait", "--", "kdray", "run", "job.yaml")
    snapshot = tmp_path / "runs" / "stopped" / "checkpoint_manager_snapshot.json"
    deadline, checked = time.monotonic() + JOB_TIMEOUT_S, time.monotonic()
    while not snapshot.exists():
        if time.monotonic() - checked > 10:  # `ray job status` takes a second or two: now and then only
            status = ray_cli("job", "status", "--address", address, submission_id).stdout
            assert time.monotonic() < deadline and ("RUNNING" in status or "PENDING" in status), (
                status, ray_cli("job", "logs", "--address", address, submission_id).stdout[-4000:])
            checked = time.monotonic()
        time.sleep(0.05)
    stop_started, stop_wall = time.monotonic(), time.time()
    stopped = ray_cli("job", "stop", "--address", address, submission_id, timeout=120)
    stop_s = time.monotonic() - stop_started
    logs = ray_cli("job", "logs", "--address", address, submission_id).stdout
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert TERMINATED_LINE in logs, logs[-4000:]
    assert_all_killed_by_sigterm(f"sqlite:///{db}", {"stopped", "teacher", "kd-seed0"})
    killed_at = max(r.info.end_time for r in all_runs(f"sqlite:///{db}")) / 1000
    print(f"`ray job stop` returned after {stop_s:.1f}s; runs KILLED {killed_at - stop_wall:.1f}s after it began")

    resumed = ray_cli(*submit, "--", "kdray", "run", "job.yaml", "--resume", timeout=JOB_TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-2000:]
    assert_all_finished(f"sqlite:///{db}")


@pytest.mark.slow
@pytest.mark.ray
def test_sigterm_stops_a_sweep_as_killed(ray_session, tmp_path):
    base = digits_job(tmp_path, None, teacher__train__epochs=2, train__epochs=20, checkpoint__every_epochs=1)
    base["mlflow"] = {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    sweep = {"name": "term-sweep", "output_dir": str(tmp_path / "out"), "base": base,
             "space": {"train.lr": {"float": [0.03, 0.3], "log": True}},
             "search": {"num_samples": 2, "asha": None, "max_concurrent": 1, "verbose": 0,
                        "register_model": False}}
    sweep_dir = tmp_path / "out" / "term-sweep"
    proc = _start_sweep(tmp_path, sweep, ray_session.get_runtime_context().gcs_address)
    try:
        deadline = time.monotonic() + 300
        while not glob.glob(str(sweep_dir / "trials" / "*" / "checkpoint" / "state.pt")):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "sweep.log").read_text()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = (tmp_path / "stderr.log").read_text()
    assert proc.returncode == 143, (tmp_path / "sweep.log").read_text()[-3000:] + stderr[-3000:]
    assert "kdray: interrupted (SIGTERM: Tune stopped the sweep with" in stderr, stderr[-3000:]
    state = json.loads((sweep_dir / "sweep.json").read_text())
    sweep_run = MlflowClient(base["mlflow"]["tracking_uri"]).get_run(state["parent_run_id"])
    assert sweep_run.info.status == "KILLED" and "SIGTERM" in sweep_run.data.tags[FAILURE_TAG]
    assert not state.get("finished") and not state.get("logged")
    running = [(r.info.run_name, r.data.tags.get("kdray.role")) for r in all_runs(base["mlflow"]["tracking_uri"])
               if r.info.status == "RUNNING"]
    assert not running, running


def _start_sweep(tmp_path, sweep: dict, ray_address: str) -> subprocess.Popen:
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    with open(tmp_path / "sweep.log", "w") as out, open(tmp_path / "stderr.log", "w") as err:
        return subprocess.Popen([sys.executable, "-m", "kdray.orchestrator.cli", "sweep", "sweep.yaml"],
                                stdout=out, stderr=err, cwd=tmp_path, env={**cli_env(), "RAY_ADDRESS": ray_address})


# --- more workers than the cluster can give -----------------------------------------------------------


@pytest.mark.ray
def test_too_many_workers_on_a_fixed_cluster_fails_before_training(ray_session, tmp_path):
    """Was: WorkerGroupStartupTimeoutError every 60 s, retried forever (Train's controller_failure_limit -1)."""
    job = digits_job(tmp_path, None, name="eight", ray__num_workers=8)
    started = time.monotonic()
    with pytest.raises(ConfigError) as err:
        kdray.distill(job)
    assert time.monotonic() - started < 30
    message = str(err.value)
    assert "\n" not in message
    assert "ray.num_workers=8" in message and "4 CPU" in message and "room for 4" in message, message
    assert not os.path.exists(tmp_path / "runs" / "eight" / "checkpoint_manager_snapshot.json")


@pytest.mark.ray
def test_too_many_workers_for_one_node_fails_before_stage_tasks(ray_session, tmp_path):
    job = digits_job(tmp_path, None, name="wide", ray__num_workers=1, ray__stage_tasks=True,
                     ray__cpus_per_worker=8)
    with pytest.raises(ConfigError, match=r"ray.num_workers=1 needs 1 x \(8 CPU\).*room for 0"):
        kdray.distill(job)


@pytest.mark.ray
def test_a_cluster_that_may_autoscale_waits_at_most_start_timeout_s(ray_session, tmp_path, monkeypatch, capsys):
    from kdray.orchestrator import runtime

    monkeypatch.setattr(runtime, "cluster_may_autoscale", lambda: True)
    job = digits_job(tmp_path, None, name="wait", ray__num_workers=8, ray__start_timeout_s=3)
    started = time.monotonic()
    with pytest.raises(ConfigError) as err:
        kdray.distill(job)
    took = time.monotonic() - started
    assert took < 60, took  # Train's own default: 60 s per try, tried forever
    message = str(err.value)
    assert "\n" not in message and "ray.start_timeout_s=3" in message and "ray.num_workers=8" in message, message
    assert "waiting up to ray.start_timeout_s=3" in capsys.readouterr().out
    assert os.environ.get(runtime.START_TIMEOUT_VAR) is None  # not left behind for later jobs
