"""Issue 5: search with Ray Tune + Optuna (conditional spaces, ASHA, Pareto sets, MLflow, resume)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from jobs import digits_job
from kdray.config import ConfigError
from kdray.search.api import repair_tune_state
from kdray.search.pareto import dominates, pareto_mask
from kdray.search.space import Space, apply_params

# A space where a smaller student than the base can win: the base is a wide MLP at a low learning rate.
SPACE = {
    "student.model": {"choice": {
        "digits_mlp": {"student.args.hidden": {"int": [8, 32], "log": True}},
        "digits_cnn": {"student.args.width": {"int": [2, 4]}},
    }},
    "train.lr": {"float": [0.03, 0.3], "log": True},
    "methods.0.temperature": {"float": [1.0, 8.0]},
}


def small_base(tmp_path, mlflow_uri=None, epochs=6):
    base = digits_job(tmp_path, mlflow_uri)
    base["student"]["args"] = {"hidden": 48}
    base["train"]["epochs"] = epochs
    return base


# --- spaces, without Ray -------------------------------------------------------------------------
def test_space_conditional_define_by_run_and_resolve():
    import optuna

    space = Space({
        "student.model": {"choice": {
            "resnet{depth}": {"depth": {"choice": [8, 14]}, "student.args.width_mult": {"float": [0.25, 1.0]}},
            "digits_mlp": {"student.args.hidden": {"int": [4, 64], "log": True}},
        }},
        "methods": {"choice": {"dkd": {"_value": [{"name": "dkd"}], "methods.0.beta": {"float": [1, 8]}},
                               "kd": None}},
        "train.batch_size": {"choice": [32, 64]},
    })
    dists = space.distributions()
    assert {"student.model", "depth@resnet{depth}", "student.args.width_mult@resnet{depth}",
            "student.args.hidden@digits_mlp", "methods.0.beta@dkd", "train.batch_size"} <= set(dists)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        space(trial)
        params = dict(space.resolve(trial.params))
        seen.add(params["student.model"])
        if params["student.model"].startswith("resnet"):
            assert params["student.model"] in ("resnet8", "resnet14")
            assert "student.args.width_mult" in params and "student.args.hidden" not in params
            assert not any(k.startswith("depth") for k in params)  # a local variable, not a config key
        else:
            assert set(trial.params) & {"depth@resnet{depth}"} == set()
        study.tell(trial, 0.0)
    assert seen >= {"resnet8", "resnet14", "digits_mlp"}
    raw = {"student": {"model": "digits_mlp", "args": {"hidden": 16}}, "methods": [{"name": "kd", "alpha": 0.9}]}
    out = apply_params(raw, [("student.model", "digits_cnn"), ("student.args.width", 4),
                             ("methods.0.beta", 2.0), ("methods", [{"name": "dkd"}])])
    assert out["student"] == {"model": "digits_cnn", "args": {"width": 4}}  # the base's MLP knobs are dropped
    assert out["methods"] == [{"name": "dkd", "beta": 2.0}]  # the list is set before its items
    assert raw["student"]["args"] == {"hidden": 16}


def test_pareto_helpers():
    modes = ["max", "min"]
    assert dominates([0.9, 100], [0.8, 200], modes) and not dominates([0.9, 100], [0.9, 100], modes)
    assert pareto_mask([[0.9, 100], [0.8, 200], [0.95, 300], [0.7, 50]], modes) == [True, False, True, True]


@pytest.mark.parametrize("space, fragment", [
    ({"train.lrr": {"float": [0.01, 0.1]}}, "unknown parameter 'train.lrr' (did you mean train.lr?)"),
    ({"student.args.hidden": {"int": [32, 8]}}, "empty range [32, 8]"),
    ({"train.lr": {"float": [0.0, 0.1], "log": True}}, "a log range needs low > 0"),
    ({"methods.0.temperature": {"choice": []}}, "empty choice"),
    ({"student.model": {"choice": {"digits_cnn": {"student.args.depth": {"int": [1, 3]}}}}},
     "model 'digits_cnn' has no knob(s) ['depth']"),
    ({"student.model": {"choice": {"resnet{depth}": {"depth": {"choice": [8, 10]}}}}},
     "unknown model 'resnet10'"),
    ({"student.model": {"choice": {"resnet{depth}": {"student.args.width_mult": {"float": [0.5, 1]}}}}},
     "does not define 'depth'"),
    ({"teacher.args.width": {"int": [8, 16]}}, "cannot be searched (the teacher is trained once per sweep"),
    ({"methods.0.alpha": {"float": [0.5, 1.5]}}, "kd.alpha must be in [0, 1]"),
    (lambda trial: {"train.lrr": trial.suggest_float("x", 0.1, 0.2)}, "unknown parameter 'train.lrr'"),
    (lambda trial: {"student.args.depth": trial.suggest_int("student.args.depth", 1, 2),
                    "student.model": trial.suggest_categorical("m", ["digits_cnn"])}, "has no knob(s) ['depth']"),
])
def test_bad_spaces_fail_in_one_line_before_any_trial(tmp_path, space, fragment):
    import kdray

    with pytest.raises(ConfigError) as info:
        kdray.sweep(space, small_base(tmp_path), num_samples=2, name="bad", output_dir=str(tmp_path / "out"))
    message = str(info.value)
    assert fragment in message, message
    assert "\n" not in message and isinstance(info.value, ValueError)
    assert not (tmp_path / "out").exists()  # nothing ran: no sweep directory, no teacher, no trial


def test_bad_search_settings_and_cli_error(tmp_path, capsys):
    import kdray
    from kdray.orchestrator.cli import main

    with pytest.raises(ConfigError, match="unknown objective 'size'"):
        kdray.sweep(SPACE, small_base(tmp_path), objectives=["val_top1:max", "size:min"])
    with pytest.raises(ConfigError, match="grid cannot have conditional blocks"):
        kdray.sweep(SPACE, small_base(tmp_path), sampler="grid", output_dir=str(tmp_path / "o"))
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"base": small_base(tmp_path), "space": {"train.epochs": {"int": [5, 2]}}}))
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdray: error: space.train.epochs: empty range [5, 2]") and "\n" not in err


# --- one multi-objective sweep with ASHA, shared by several checks ---------------------------------
@pytest.fixture(scope="module")
def mo_sweep(ray_session, tmp_path_factory):
    import kdray

    tmp = tmp_path_factory.mktemp("mo")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    result = kdray.sweep(SPACE, small_base(tmp, uri), num_samples=8, objectives=["val_top1:max", "params:min"],
                         sampler="tpe", asha={"grace_period": 1, "reduction_factor": 2}, seeds=[0],
                         max_concurrent=2, name="mo", output_dir=str(tmp / "out"), verbose=0, log=lambda m: None)
    return result, uri


@pytest.mark.ray
def test_asha_stops_trials_early(mo_sweep):
    result, _ = mo_sweep
    trials, max_epochs = result.trials, 6
    assert len(trials) == 8 and trials["trial_id"].is_unique
    stopped = trials["status"].isin(["early_stopped", "reevaluated"])
    assert stopped.any(), trials[["name", "status", "epoch"]]
    tune_epochs = trials.apply(lambda r: r["epoch"] if r["status"] == "early_stopped" else
                               (r["epochs"] if r["status"] == "complete" else 0), axis=1)
    assert trials["trial_epochs"].sum() < len(trials) * max_epochs  # re-evaluations included
    assert tune_epochs.sum() < len(trials) * max_epochs


@pytest.mark.ray
def test_ctrl_c_handler_is_python_s_again_after_a_sweep(mo_sweep):
    """Tune's fit() leaves its own SIGINT handler installed; after kdray.sweep, Ctrl-C interrupts again."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.ray
def test_pareto_set_is_not_dominated(mo_sweep):
    result, _ = mo_sweep
    trials, pareto = result.trials, result.pareto
    assert len(pareto) >= 1
    assert set(pareto["status"]) <= {"complete", "reevaluated"}  # ASHA-stopped trials only after re-evaluation
    modes = ["max", "min"]
    others = trials[trials["status"] != "error"]
    for _, p in pareto.iterrows():
        for _, q in others.iterrows():
            assert not dominates([q["val_top1"], q["params"]], [p["val_top1"], p["params"]], modes), (p, q)


@pytest.mark.ray
def test_sweep_beats_base_with_a_smaller_student(mo_sweep):
    result, _ = mo_sweep
    base, best = result.base, result.best
    assert base["seeds"] == 1 and result.best_config["seeds"] == [0]  # same seeds, same split as the base
    smaller = result.smaller
    assert smaller is not None, (base, result.trials[["name", "val_top1", "params", "status"]])
    assert smaller["val_top1"] >= base["val_top1"] and smaller["params"] < base["params"]
    assert smaller["full_budget"] and smaller["status"] in ("complete", "reevaluated")
    assert best["val_top1"] >= base["val_top1"]
    cfg = kdray_config(result.best_config)
    assert cfg.teacher.checkpoint and os.path.isfile(cfg.teacher.checkpoint)  # the sweep's trained teacher


def kdray_config(raw):
    from kdray.config import load_config

    return load_config(raw)


@pytest.mark.ray
def test_sweep_is_tracked_in_mlflow(mo_sweep, monkeypatch):
    from mlflow.tracking import MlflowClient

    result, uri = mo_sweep
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("kdray")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`kdray.role` = 'sweep'")
    assert [r.info.run_id for r in parents] == [result.parent_run_id]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    names = sorted(r.info.run_name for r in children)
    assert names == sorted(["base", *result.trials["name"]])
    by_name = {r.info.run_name: r for r in children}
    for _, row in result.trials.iterrows():
        run = by_name[row["name"]]
        assert run.info.run_id == row["run_id"]
        assert run.data.tags["kdray.sweep.status"] == row["status"]
        expected = "KILLED" if row["status"] == "early_stopped" else "FINISHED"
        assert run.info.status == expected, (row["name"], run.info.status)
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"accuracy_vs_size.png", "pareto_front.png", "param_importances.png", "best_config.yaml",
            "trials.csv"} <= artifacts
    assert parent.data.metrics["best_val_top1"] == pytest.approx(result.best["val_top1"])
    assert parent.data.params["best.student.model"] == result.best_params["student.model"]
    version = client.get_model_version_by_alias(result.registered["name"], "champion")
    assert str(version.version) == result.registered["version"]
    import mlflow.pytorch

    assert "MLFLOW_TRACKING_URI" not in os.environ  # the sweep left the process's MLflow settings alone
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pytorch.load_model(f"models:/{result.registered['name']}@champion")
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == result.best["params"]


def pd_isna(value) -> bool:
    import pandas as pd

    return bool(pd.isna(value))


def conditional_space(trial):
    """A Python define-by-run space: the family first, then its own width knob."""
    family = trial.suggest_categorical("student.model", ["digits_mlp", "digits_cnn"])
    if family == "digits_mlp":
        trial.suggest_int("student.args.hidden", 8, 16)
    else:
        trial.suggest_int("student.args.width", 2, 3)
    trial.suggest_float("train.lr", 0.05, 0.2, log=True)


@pytest.mark.ray
def test_seeds_are_repeated_and_averaged_with_latency_objective(ray_session, tmp_path):
    import kdray
    from kdray.orchestrator.checkpoints import LocalCheckpoints

    result = kdray.sweep(conditional_space, small_base(tmp_path, epochs=3), num_samples=2,
                         objectives=["val_top1:max", "latency_ms:min"], sampler="nsga2", asha=False, seeds=[0, 1],
                         max_concurrent=2, name="seeds", output_dir=str(tmp_path / "out"), verbose=0,
                         log=lambda m: None)
    assert result.base["seeds"] == 2
    for _, row in result.trials.iterrows():
        done = LocalCheckpoints(row["run_dir"]).latest()["done"]
        vals = [s["val_top1"] for s in done.values() if s["kind"] == "distill"]
        assert sorted(s["seed"] for s in done.values() if s["kind"] == "distill") == [0, 1]
        assert row["val_top1"] == pytest.approx(sum(vals) / 2)
        assert row["trial_epochs"] == 6 and row["latency_ms"] > 0
        knob = "student.args.hidden" if row["student.model"] == "digits_mlp" else "student.args.width"
        assert knob in row and not pd_isna(row[knob])
    assert len(result.pareto) >= 1 and "latency_ms" in result.pareto.columns


# --- resume after the driver is killed -------------------------------------------------------------
def _finished(trials_dir: str) -> set[str]:
    """Trials that wrote their result (full budget)."""
    if not os.path.isdir(trials_dir):
        return set()
    return {d for d in os.listdir(trials_dir) if os.path.exists(os.path.join(trials_dir, d, "trial_result.json"))}


def _saved_trials(sweep_dir) -> dict[str, str]:
    """Trial name -> status in Tune's saved experiment state. A trial started just before the kill may not
    be in it yet: the resumed sweep removes that one's runs, and Tune samples a new trial instead."""
    saved = {}
    for f in (sweep_dir / "tune").glob("experiment_state-*.json"):
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        for item in data.get("trial_data", []):
            trial = json.loads(item[0] if isinstance(item, list) else item)
            saved["trial-" + trial["trial_id"]] = trial.get("status")
    return saved


def _running_in_tune(sweep_dir) -> set[str]:
    return {name for name, status in _saved_trials(sweep_dir).items() if status == "RUNNING"}


def _latest_tune_trials(sweep_dir) -> list[dict]:
    """Tune's trials in the experiment state of its latest session (``experiment_state-<session>.json``)."""
    latest = sorted((sweep_dir / "tune").glob("experiment_state-*.json"))[-1]
    return [json.loads(item[0] if isinstance(item, list) else item)
            for item in json.loads(latest.read_text())["trial_data"]]


def _in_flight(sweep_dir, trials_dir: str, before_epoch: int | None = None) -> set[str]:
    """Trials Tune saved as RUNNING that have started their job (MLflow runs) and not finished it; with
    ``before_epoch``, only those not past that epoch (far from their end, so still running at the kill)."""
    from kdray.orchestrator.checkpoints import LocalCheckpoints

    out = set()
    for d in _running_in_tune(sweep_dir) - _finished(trials_dir):
        if not os.path.exists(os.path.join(trials_dir, d, "mlflow_runs.json")):
            continue
        if before_epoch is not None:
            try:
                state = LocalCheckpoints(os.path.join(trials_dir, d)).latest()
            except Exception:  # noqa: BLE001  (being written)
                continue
            if state and (state.get("loop") is None or int(state["loop"]["epoch"]) > before_epoch):
                continue
        out.add(d)
    return out


@pytest.mark.ray
@pytest.mark.slow
def test_resume_after_killing_the_driver(ray_session, workdir):
    from mlflow.tracking import MlflowClient

    from kdray.orchestrator.cli import main

    tmp_path, n = workdir, 6
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the default store (./mlflow.db), not named in the config
    base = small_base(tmp_path, epochs=8)
    base["mlflow"] = {"enabled": True}
    base["data"]["options"]["train_fraction"] = 1.0  # epochs long enough to catch a trial in flight
    base["checkpoint"] = {"every_epochs": 1}
    sweep_yaml = tmp_path / "sweep.yaml"
    sweep_yaml.write_text(yaml.safe_dump({
        "name": "resume", "output_dir": str(tmp_path / "out"), "base": base, "space": SPACE,
        "search": {"num_samples": n, "sampler": "tpe", "asha": None, "max_concurrent": 2, "verbose": 0,
                   "register_model": False},
    }))
    sweep_dir = tmp_path / "out" / "resume"
    trials_dir = str(sweep_dir / "trials")
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen([sys.executable, "-m", "kdray.orchestrator.cli", "sweep", "sweep.yaml"],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    deadline = time.time() + 300
    while time.time() < deadline and driver.poll() is None and not (
            len(_finished(trials_dir)) >= 2 and _in_flight(sweep_dir, trials_dir, before_epoch=4)):
        time.sleep(0.05)
    assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
    os.kill(driver.pid, signal.SIGKILL)  # with >= 2 trials finished and one in flight
    driver.wait()
    repair_tune_state(str(sweep_dir / "tune"))  # what --resume does first: a state file cut short by the kill
    state = json.loads((sweep_dir / "sweep.json").read_text())
    client = MlflowClient(uri)
    assert client.get_run(state["parent_run_id"]).info.status == "RUNNING"  # left behind by the dead driver
    in_flight = {}
    for d in _in_flight(sweep_dir, trials_dir):
        with open(os.path.join(trials_dir, d, "mlflow_runs.json")) as fh:
            in_flight[d] = json.load(fh)["parent"]
    finished_before = _finished(trials_dir) & set(_saved_trials(sweep_dir))
    assert len(finished_before) >= 2 and in_flight
    mtimes = {d: os.path.getmtime(os.path.join(trials_dir, d, "trial_result.json")) for d in finished_before}

    assert main(["sweep", "sweep.yaml", "--resume"]) == 0

    trials = _latest_tune_trials(sweep_dir)
    ids = [t["trial_id"] for t in trials]
    assert len(ids) == n and len(set(ids)) == n and {t["status"] for t in trials} == {"TERMINATED"}
    exp = client.get_experiment_by_name("kdray")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`kdray.role` = 'sweep'")
    assert [r.info.run_id for r in parents] == [state["parent_run_id"]]  # reopened, not duplicated
    assert parents[0].info.status == "FINISHED"
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{state['parent_run_id']}'")
    trial_runs = [r for r in children if r.info.run_name.startswith("trial-")]
    assert sorted(r.info.run_name for r in trial_runs) == sorted(f"trial-{i}" for i in ids)
    by_name = {r.info.run_name: r.info.run_id for r in trial_runs}
    for name, run_id in in_flight.items():
        assert by_name[name] == run_id  # the interrupted trial went on in its own MLflow run
    for name in finished_before:  # finished trials were neither re-run nor re-logged
        assert os.path.getmtime(os.path.join(trials_dir, name, "trial_result.json")) == mtimes[name]
    for name in [*finished_before, *in_flight]:  # every epoch logged once
        run_id = by_name[name]
        stage_runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'")
        for stage in stage_runs:
            steps = [m.step for m in client.get_metric_history(stage.info.run_id, "val_top1")]
            assert len(steps) == len(set(steps)), (name, steps)


@pytest.mark.ray
@pytest.mark.slow
def test_ctrl_c_stops_a_sweep_as_killed_and_resume_finishes_it(ray_session, workdir):
    """Tune answers Ctrl-C by stopping its trials and returning partial results; kdray must not rank and
    register them as a finished sweep: exit 130, sweep run KILLED, then ``--resume`` ends all trials."""
    from mlflow.tracking import MlflowClient

    from kdray.orchestrator.cli import main

    tmp_path, n = workdir, 4
    base = small_base(tmp_path, epochs=8)
    base["mlflow"] = {"enabled": True}
    base["data"]["options"]["train_fraction"] = 1.0
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "ctrl-c", "output_dir": str(tmp_path / "out"), "base": base, "space": SPACE,
        "search": {"num_samples": n, "asha": None, "max_concurrent": 2, "verbose": 0, "register_model": False},
    }))
    sweep_dir = tmp_path / "out" / "ctrl-c"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen([sys.executable, "-m", "kdray.orchestrator.cli", "sweep", "sweep.yaml"],
                                  env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                  cwd=tmp_path)
        deadline = time.time() + 300
        while time.time() < deadline and driver.poll() is None and not _in_flight(
                sweep_dir, str(sweep_dir / "trials"), before_epoch=4):
            time.sleep(0.05)
        driver.send_signal(signal.SIGINT)
        try:
            driver.wait(120)
        finally:
            if driver.poll() is None:
                driver.kill()
    output = (tmp_path / "driver.log").read_text()
    assert driver.returncode == 130, output[-3000:]
    assert "kdray: interrupted (Ctrl-C: Tune stopped the sweep with" in output
    state = json.loads((sweep_dir / "sweep.json").read_text())
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    stopped = client.get_run(state["parent_run_id"])
    assert stopped.info.status == "KILLED" and stopped.data.tags["kdray.failure_reason"].startswith(
        "KeyboardInterrupt")
    assert not state.get("finished") and not state.get("logged")  # nothing ranked or logged as an outcome

    assert main(["sweep", "sweep.yaml", "--resume"]) == 0
    trials = _latest_tune_trials(sweep_dir)
    assert len(trials) == n and {t["status"] for t in trials} == {"TERMINATED"}, trials
    assert client.get_run(state["parent_run_id"]).info.status == "FINISHED"


# --- Train inside Tune ---------------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.slow
def test_train_inside_tune_two_workers_per_trial(ray_session, tmp_path):
    import kdray

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = small_base(tmp_path, uri, epochs=3)
    base["ray"]["cpus_per_worker"] = 0.5  # 1 + 2 x 0.5 CPUs per trial: both trials at once on 4 logical CPUs
    result = kdray.sweep({"train.lr": {"float": [0.05, 0.2], "log": True}}, base, num_samples=2,
                         asha={"grace_period": 1}, workers_per_trial=2, base_workers=0, name="train",
                         output_dir=str(tmp_path / "o"), verbose=0, register_model=False, log=lambda m: None)
    assert len(result.trials) == 2
    assert set(result.trials["status"]) <= {"complete", "early_stopped"}
    assert (result.trials["status"] == "complete").any()
    # every trial ran as a Ray Train run named after the trial, beside its own job's MLflow runs
    for _, row in result.trials.iterrows():
        assert os.path.exists(os.path.join(row["run_dir"], "mlflow_runs.json"))
        assert any(d.startswith("checkpoint_") for d in os.listdir(row["run_dir"])) or row["status"] != "complete"


# --- `ray job submit -- kdray sweep` on a real head ---------------------------------------------------
@pytest.mark.slow
def test_sweep_under_ray_job_submit(tmp_path, request):
    import uuid

    from mlflow.tracking import MlflowClient

    from ray_cluster import ray_cli

    address, temp_dir = request.getfixturevalue("ray_head")
    workdir = tmp_path / "working_dir"
    workdir.mkdir()
    db = tmp_path / "mlflow.db"
    base = small_base(tmp_path, epochs=3)
    base["mlflow"] = {"experiment": "submitted-sweep"}  # the store comes from the job's environment
    (workdir / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "submitted", "output_dir": str(tmp_path / "out"), "base": base,
        "space": {"train.lr": {"float": [0.05, 0.2], "log": True}},
        "search": {"num_samples": 3, "asha": None, "register_model": False},
    }))
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": f"sqlite:///{db}", "RAY_AUTH_MODE": "disabled",
                                "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0"}}
    submission_id = f"kdray-sweep-{uuid.uuid4().hex[:8]}"
    submitted = ray_cli("job", "submit", "--address", address, "--submission-id", submission_id,
                         "--working-dir", str(workdir), "--runtime-env-json", json.dumps(runtime_env),
                         "--", "kdray", "sweep", "sweep.yaml", timeout=300)
    status = ray_cli("job", "status", "--address", address, submission_id)
    assert f"Job '{submission_id}' succeeded" in status.stdout + status.stderr, submitted.stdout[-4000:]
    assert "[3/3] trial-" in submitted.stdout and "Pareto set" not in submitted.stdout  # single objective
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("submitted-sweep")
    parent = client.search_runs([exp.experiment_id], "tags.`kdray.role` = 'sweep'")
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent[0].info.run_id}'")
    assert sorted(r.info.run_name.split("-")[0] for r in children) == ["base", "trial", "trial", "trial"]
    # the trials ran on that head, not on a Ray of the job's own
    logs_dir = os.path.join(temp_dir, "session_latest", "logs")
    assert any(n.startswith("worker-") for n in os.listdir(logs_dir))


def test_the_nsga2_sampler_pickles_as_tune_saves_it():
    """Optuna 5.1's NSGA-II holds a threading.Lock: Tune could not save a sweep's state (every NSGA-II sweep failed
    before its first trial). kdray's sampler pickles, and unpickles with a working lock and the same settings."""
    import pickle
    import threading

    from ray import cloudpickle

    from kdray.search.searcher import PicklableNSGAIISampler

    sampler = PicklableNSGAIISampler(population_size=6, seed=3)
    for dumps in (pickle.dumps, cloudpickle.dumps):
        back = pickle.loads(dumps(sampler))
        assert isinstance(back._thread_lock, type(threading.Lock())) and back._population_size == 6
        with back._thread_lock:
            pass


def test_a_scheme_a_sweep_cannot_optimise_is_refused_in_one_line(tmp_path):
    import kdray

    base = small_base(tmp_path)
    base.pop("teacher")
    base.update(scheme="online", online={"peers": [{"model": "digits_mlp"}, {"model": "digits_mlp"}]})
    with pytest.raises(ConfigError, match=r"base: a sweep distils from one teacher \(teacher: with scheme "
                                          r"offline \| adversarial \| data_free \| deep_inversion.*\), got scheme "
                                          r"'online' without teacher:"):
        kdray.sweep({"train.lr": {"float": [0.05, 0.2]}}, base, num_samples=1, output_dir=str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


@pytest.mark.ray
def test_data_free_generator_loss_weights_are_searchable(ray_session, tmp_path):
    """``kdray sweep`` over DAFL's generator-loss weights (``data_free.alpha`` / ``beta``): the base trains the
    teacher once, every trial is a data-free job on that teacher (no noise baseline) whose data-free student's
    val top-1 is the objective, and each trial's sampled weights reach its job."""
    import kdray
    from kdray.orchestrator.checkpoints import LocalCheckpoints

    base = digits_job(tmp_path, scheme="data_free", train__epochs=2, teacher__train__epochs=3)
    base["data_free"] = {"latent_dim": 16, "generator_width": 16, "steps_per_epoch": 3, "batch_size": 32,
                         "input_mean": 0.3, "input_std": 0.375}
    space = {"data_free.alpha": {"float": [0.05, 0.5]}, "data_free.beta": {"float": [1.0, 10.0]}}
    result = kdray.sweep(space, base, num_samples=2, asha=False, name="df", output_dir=str(tmp_path / "out"),
                         verbose=0, log=lambda m: None)
    assert len(result.trials) == 2 and (result.trials["status"] == "complete").all(), result.trials
    for _, row in result.trials.iterrows():
        done = LocalCheckpoints(row["run_dir"]).latest()["done"]
        assert sorted(s["kind"] for s in done.values()) == ["data_free"]  # teacher from the sweep, no noise stage
        [stage] = done.values()
        assert row["val_top1"] == pytest.approx(stage["val_top1"])
        job = json.loads(open(os.path.join(row["run_dir"], "config.json")).read())
        assert job["data_free"]["alpha"] == pytest.approx(row["data_free.alpha"])
        assert job["data_free"]["noise_baseline"] is False
