"""A job directory belongs to one config and one driver: ``--resume`` with another config is refused in one
line (the first job untouched), result-neutral keys may change, a never-run job starts; a second driver for a
running job is refused at once naming the first; two processes creating a new MLflow store at once both work."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

import kdray
from jobs import digits_job
from kdray.config import load_config
from kdray.orchestrator.checkpoints import load_state
from kdray.orchestrator.plan import plan_stages
from kdray.orchestrator.run_dir import CONFIG_FILE, LOCK_FILE, RunDir

TINY = dict(teacher__train__epochs=1, train__epochs=1)


def job_runs(client: MlflowClient) -> list:
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exp_ids, "tags.`kdray.role` = 'job'") if exp_ids else []


def snapshot(client: MlflowClient, run_dir) -> dict:
    """Everything a refused resume must leave as it was: every run's status, tags, params and metrics, the run
    ids file and the checkpoint's bytes."""
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    runs = {r.info.run_id: (r.info.status, r.info.end_time, r.data.tags, r.data.params, r.data.metrics)
            for r in client.search_runs(exp_ids, "")}
    return {"runs": runs, "ids": (run_dir / "mlflow_runs.json").read_text(),
            "checkpoint": (run_dir / "checkpoint" / "state.pt").read_bytes()}


def test_resume_with_another_config_is_refused_listing_keys_and_leaves_the_job_untouched(tmp_path, mlflow_uri):
    job = digits_job(tmp_path, mlflow_uri, **TINY)
    kdray.distill(job)
    run_dir = tmp_path / "runs" / "t"
    client = MlflowClient(mlflow_uri)
    before = snapshot(client, run_dir)
    changed = digits_job(tmp_path, mlflow_uri, **TINY, student__args={"hidden": 32}, methods=[{"name": "dkd"}])
    with pytest.raises(kdray.ConfigError) as err:
        kdray.distill(changed, resume=True)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"job 't' in {run_dir} was made by another config (")
    assert "student.args.hidden: 16 -> 32" in message and "methods.0.name: kd -> dkd" in message
    assert message.endswith("resume with the same config, or choose another name=")
    with pytest.raises(kdray.ConfigError, match="is tracked in .*resume with mlflow.tracking_uri="):
        kdray.distill(digits_job(tmp_path, f"sqlite:///{tmp_path / 'other.db'}", **TINY), resume=True)
    assert snapshot(client, run_dir) == before
    assert not (tmp_path / "other.db").exists()
    assert json.loads((run_dir / CONFIG_FILE).read_text()) == load_config(job).model_dump(mode="json")


def test_resume_with_the_same_config_or_result_neutral_changes_is_accepted(tmp_path, mlflow_uri):
    job = digits_job(tmp_path, mlflow_uri, **TINY)
    first = kdray.distill(job)
    saved = (tmp_path / "runs" / "t" / CONFIG_FILE).read_text()
    assert json.loads(saved) == load_config(job).model_dump(mode="json")
    again = kdray.distill(job, resume=True)
    assert again.parent_run_id == first.parent_run_id and again.stages == first.stages
    neutral = digits_job(tmp_path, mlflow_uri, **TINY, ray__address="ray://elsewhere:10001", ray__max_failures=3,
                         checkpoint={"keep": 5, "every_epochs": 3})
    assert kdray.distill(neutral, resume=True).stages == first.stages
    assert (tmp_path / "runs" / "t" / CONFIG_FILE).read_text() == saved  # the config that made the job
    [run] = job_runs(MlflowClient(mlflow_uri))
    assert run.info.status == "FINISHED"


def test_a_key_added_to_kdray_since_the_job_started_compares_at_its_default(tmp_path):
    cfg = load_config(digits_job(tmp_path, **TINY))
    current = cfg.model_dump(mode="json")
    older = json.loads(json.dumps(current))
    del older["ce_weight"], older["train"]["gamma"]  # as if saved by a kdray without these keys (defaults)
    job_dir = RunDir(str(tmp_path / "job"), "t")
    job_dir.save_config(older)
    job_dir.check_same_config(current, normalize=lambda saved: type(cfg).model_validate(saved).model_dump(mode="json"))
    with pytest.raises(kdray.ConfigError, match=r"ce_weight: \(unset\) -> 1.0"):
        job_dir.check_same_config(current)  # compared as saved, the missing key is a change


def test_resume_of_a_job_that_never_ran_says_so_and_runs_it(tmp_path, mlflow_uri):
    lines: list[str] = []
    result = kdray.distill(digits_job(tmp_path, mlflow_uri, **TINY), resume=True, log=lines.append)
    assert lines[0] == f"job 't' has not run in {tmp_path / 'runs' / 't'} yet: starting it"
    assert [s["kind"] for s in result.stages] == ["teacher", "distill"]
    assert (tmp_path / "runs" / "t" / CONFIG_FILE).exists()
    [run] = job_runs(MlflowClient(mlflow_uri))
    assert run.info.status == "FINISHED"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    return {**env, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def _driver(tmp_path, job: dict) -> list[str]:
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    return [sys.executable, "-m", "kdray.orchestrator.cli", "run", str(tmp_path / "job.yaml")]


def _assert_refused_by(line: str, run_dir, pid: int) -> None:
    assert line.startswith(f"kdray: error: job 't' in {run_dir} is being run by another driver (pid {pid} "
                           f"on host {socket.gethostname()}, since "), line
    assert line.endswith("); wait for it to end, or choose another name="), line


def _assert_one_intact_job(mlflow_uri: str, run_dir, job: dict, pid: int) -> None:
    """One FINISHED job run, by driver ``pid``; the run ids file names it; its stages and checkpoint complete."""
    client = MlflowClient(mlflow_uri)
    [run] = job_runs(client)
    assert run.info.status == "FINISHED" and run.data.tags["kdray.driver_pid"] == str(pid)
    ids = json.loads((run_dir / "mlflow_runs.json").read_text())
    assert ids["parent"] == run.info.run_id
    assert {client.get_run(i).info.status for i in ids["stages"].values()} == {"FINISHED"}
    state = load_state(str(run_dir / "checkpoint" / "state.pt"))
    assert sorted(state["done"]) == sorted(s.name for s in plan_stages(load_config(job)))
    assert (run_dir / LOCK_FILE).read_text() == ""  # released: the next driver may take it


def test_a_second_driver_is_refused_at_once_naming_the_first_which_finishes_intact(tmp_path, mlflow_uri):
    """The first driver is paused (SIGSTOP) once its job is under way, so the second (a ``--resume``, as after
    a crash that was none) surely meets it running."""
    job = digits_job(tmp_path, mlflow_uri, teacher__train__epochs=3, train__epochs=3)
    cmd = _driver(tmp_path, job)
    run_dir = tmp_path / "runs" / "t"
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=_env())
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "mlflow_runs.json").exists():
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)
        try:
            # with the first stopped, a second that waited for the lock would time out here
            second = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, cwd=tmp_path, env=_env(),
                                    timeout=120)
        finally:
            first.send_signal(signal.SIGCONT)
        assert first.wait(120) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 2, second.stderr[-3000:]
    [line] = second.stderr.strip().splitlines()
    _assert_refused_by(line, run_dir, first.pid)
    _assert_one_intact_job(mlflow_uri, run_dir, job, first.pid)


@pytest.mark.slow
def test_two_drivers_started_at_once_run_the_job_once(tmp_path, mlflow_uri):
    """The issue's race: two identical ``kdray run`` at the same moment in a fresh directory (before the fix both
    trained everything, or one died creating the MLflow store)."""
    job = digits_job(tmp_path, mlflow_uri, teacher__train__epochs=3, train__epochs=3)
    cmd = _driver(tmp_path, job)
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                              env=_env()) for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [err[-2000:] for _, err in outs]
    winner, loser = (0, 1) if procs[0].returncode == 0 else (1, 0)
    _assert_refused_by(outs[loser][1].strip().splitlines()[-1], tmp_path / "runs" / "t", procs[winner].pid)
    _assert_one_intact_job(mlflow_uri, tmp_path / "runs" / "t", job, procs[winner].pid)

STORE_USER = textwrap.dedent("""
    import os, sys, time
    from kdray.orchestrator.tracking import JobTracking, experiment_id
    uri, go, ready = sys.argv[1:4]
    open(ready, "w").close()
    while not os.path.exists(go):
        time.sleep(0.002)
    tracking = JobTracking(uri, "kdray", os.path.dirname(go))
    print(experiment_id(tracking.client, "kdray", uri))
""")


@pytest.mark.slow  # four Python processes importing MLflow: 17-50 s on a busy 2-core machine
def test_two_processes_creating_a_new_mlflow_store_at_once_both_succeed(tmp_path):
    """Two fresh stores, two processes each, released together (before the fix one or both of a pair died
    in MLflow's schema creation, or in a duplicate experiment creation)."""
    script = tmp_path / "store_user.py"
    script.write_text(STORE_USER)
    go = tmp_path / "go"
    procs = []
    for store in range(2):
        for k in range(2):
            ready = tmp_path / f"ready-{store}-{k}"
            procs.append((store, ready, subprocess.Popen(
                [sys.executable, str(script), f"sqlite:///{tmp_path / f'store{store}' / 'mlflow.db'}", str(go),
                 str(ready)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())))
        (tmp_path / f"store{store}").mkdir()
    deadline = time.monotonic() + 120
    while not all(ready.exists() for _, ready, _ in procs):
        assert time.monotonic() < deadline and all(p.poll() is None for *_, p in procs)
        time.sleep(0.01)
    go.touch()
    ids: dict[int, set] = {}
    for store, _, proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        ids.setdefault(store, set()).add(out.strip())
    assert all(len(found) == 1 for found in ids.values()), ids  # both processes found the same experiment


def test_an_experiment_created_meanwhile_by_another_process_is_read_back(mlflow_uri):
    """The window between "no such experiment" and creating it: another command created it there."""
    from kdray.orchestrator.tracking import experiment_id

    theirs = MlflowClient(mlflow_uri).create_experiment("kdray")

    class LookedTooEarly(MlflowClient):
        looks = 0

        def get_experiment_by_name(self, name):
            self.looks += 1
            return None if self.looks == 1 else super().get_experiment_by_name(name)

    assert experiment_id(LookedTooEarly(mlflow_uri), "kdray", mlflow_uri) == theirs
