"""MLflow store read back with MlflowClient: params, per-epoch metrics, artifacts, parent/child runs."""
import json
import os

from mlflow.tracking import MlflowClient

import kdray
from jobs import digits_job


def test_job_is_recorded_as_parent_and_child_runs(tmp_path, mlflow_uri):
    result = kdray.distill(digits_job(tmp_path, mlflow_uri, baseline=True, seeds=[0, 1], train__epochs=5,
                                      teacher__train__epochs=5))
    client = MlflowClient(mlflow_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["student.model"] == "digits_mlp"
    assert parent.data.params["methods"].startswith("[{")
    import statistics

    assert parent.data.metrics["distill_test_top1_mean"] == statistics.mean(result.accuracies("distill"))
    parent_files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.json", "results.md", "test_accuracy.png"} <= parent_files

    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    names = {c.info.run_name: c for c in children}
    assert set(names) == {"teacher", "scratch-seed0", "kd-seed0", "scratch-seed1", "kd-seed1"}
    kd = names["kd-seed1"]
    assert kd.data.params["seed"] == "1" and kd.data.params["kind"] == "distill"
    for key in ("train_ce", "train_kd", "train_loss", "val_top1", "val_top5", "lr"):
        steps = [m.step for m in client.get_metric_history(kd.info.run_id, key)]
        assert sorted(steps) == [0, 1, 2, 3, 4], key
    lrs = [m.value for m in sorted(client.get_metric_history(kd.info.run_id, "lr"), key=lambda m: m.step)]
    assert lrs[0] > lrs[-1]  # cosine schedule logged per epoch
    assert kd.data.metrics["test_top1"] == result.accuracies("distill")[1]
    files = {a.path for a in client.list_artifacts(kd.info.run_id)} | {
        a.path for a in client.list_artifacts(kd.info.run_id, "model")}
    assert {"accuracy_curve.png", "model/state_dict.pt", "model/model_spec.json"} <= files
    local = client.download_artifacts(kd.info.run_id, "model")
    spec = json.load(open(os.path.join(local, "model_spec.json")))
    assert spec == {"model": "digits_mlp", "args": {"hidden": 16}, "num_classes": 10}
    import torch

    state = torch.load(os.path.join(local, "state_dict.pt"), weights_only=True)
    assert set(state) == {"body.1.weight", "body.1.bias", "fc.weight", "fc.bias"}  # student only, no connectors


def test_teacher_loads_from_mlflow_uri_and_from_checkpoint(tmp_path, mlflow_uri):
    first = kdray.distill(digits_job(tmp_path, mlflow_uri, name="make-teacher", train__epochs=2))
    client = MlflowClient(mlflow_uri)
    exp = client.get_run(first.parent_run_id).info.experiment_id
    teacher_run = client.search_runs([exp], "attributes.run_name = 'teacher'")[0]
    teacher_acc = first.accuracies("teacher")[0]

    via_mlflow = kdray.distill(digits_job(
        tmp_path, mlflow_uri, name="from-mlflow", train__epochs=2,
        teacher={"model": "digits_cnn", "mlflow_uri": f"runs:/{teacher_run.info.run_id}/model"}))
    assert via_mlflow.accuracies("teacher") == []  # no teacher stage: it was loaded

    local = client.download_artifacts(teacher_run.info.run_id, "model/state_dict.pt")
    via_file = kdray.distill(digits_job(tmp_path, None, name="from-file", train__epochs=2,
                                        teacher={"model": "digits_cnn", "checkpoint": local}))
    assert via_file.accuracies("distill")[0] == via_mlflow.accuracies("distill")[0]
    assert teacher_acc > 0.8


def test_default_store_is_absolute_sqlite_in_cwd(workdir):
    from kdray.orchestrator.tracking import resolve_tracking_uri

    assert resolve_tracking_uri(None) == f"sqlite:///{workdir}/mlflow.db"
    assert resolve_tracking_uri("sqlite:///rel.db") == f"sqlite:///{workdir}/rel.db"
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_models_datasets_description_and_system_metrics_in_mlflow(tmp_path, mlflow_uri, monkeypatch):
    """What the MLflow UI shows: a training experiment, each trained model as a loadable logged model with a
    registry version pointing at it, the datasets on each stage run, the results table as the job run's
    description, and system metrics sampled during training."""
    import json as _json

    import mlflow
    import torch
    from torch.utils.data import DataLoader

    from kdray.algorithms.engine import evaluate
    from kdray.config import load_config
    from kdray.orchestrator.build import build_splits
    from kdray.orchestrator.mlflow_internals import fluent_store

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    cfg = digits_job(tmp_path, mlflow_uri, name="ui", train__epochs=2, teacher__train__epochs=2)
    result = kdray.distill(cfg)
    client = MlflowClient(mlflow_uri)
    parent = client.get_run(result.parent_run_id)
    exp = parent.info.experiment_id
    assert client.get_experiment(exp).tags["mlflow.experimentKind"] == "custom_model_development"
    assert parent.data.tags["mlflow.note.content"] == result.table()

    splits = build_splits(load_config(cfg))
    test = DataLoader(splits.test, batch_size=256)
    stages = {r.info.run_name: r for r in client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    assert set(stages) == {"teacher", "kd-seed0"}
    for name, kind in (("teacher", "teacher"), ("kd-seed0", "distill")):
        run = stages[name]
        [output] = run.outputs.model_outputs
        logged = client.get_logged_model(output.model_id)
        assert (logged.name, logged.source_run_id, logged.experiment_id) == (name, run.info.run_id, exp)
        with fluent_store(mlflow_uri):
            model = mlflow.pytorch.load_model(f"models:/{output.model_id}")
        # the trained model itself: its test accuracy is the one kdray reported, its logits those of the weights
        accuracy = evaluate(model, test, torch.device("cpu"), splits.num_classes)["top1"]
        assert accuracy == result.accuracies(kind)[0]
        from kdray.models import create_model

        spec = _json.load(open(client.download_artifacts(run.info.run_id, "model/model_spec.json")))
        trained = create_model(spec["model"], spec["num_classes"], **spec["args"]).eval()
        trained.load_state_dict(torch.load(client.download_artifacts(run.info.run_id, "model/state_dict.pt"),
                                           weights_only=True))
        x = torch.stack([splits.test[i][0] for i in range(8)])
        with torch.no_grad():
            assert torch.equal(model(x), trained(x))
        [version] = client.search_model_versions(f"name = 'ui-{kind}'")
        assert (version.run_id, version.source) == (run.info.run_id, f"models:/{output.model_id}")
        assert {"name": f"ui-{kind}", "version": version.version} in _json.loads(logged.tags["mlflow.modelVersions"])
        inputs = {[t.value for t in i.tags if t.key == "mlflow.data.context"][0]: i.dataset
                  for i in run.inputs.dataset_inputs}
        assert set(inputs) == {"training", "validation", "test"}
        assert {d.name for d in inputs.values()} == {"digits"}
        assert _json.loads(inputs["training"].profile)["num_rows"] == len(splits.train)
        assert _json.loads(inputs["test"].profile)["num_rows"] == len(splits.test)
        assert len({d.digest for d in inputs.values()}) == 3
        assert run.data.metrics["system/cpu_utilization_percentage"] >= 0
        assert run.data.metrics["system/system_memory_usage_megabytes"] > 0


def test_system_metrics_can_be_turned_off(tmp_path, mlflow_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    result = kdray.distill(digits_job(tmp_path, mlflow_uri, train__epochs=1, teacher__train__epochs=1,
                                      mlflow__system_metrics=False))
    client = MlflowClient(mlflow_uri)
    exp = client.get_run(result.parent_run_id).info.experiment_id
    runs = client.search_runs([exp], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert not [k for r in runs for k in r.data.metrics if k.startswith("system/")]


def test_stage_end_repeated_after_a_crash_logs_one_model_and_one_version(tmp_path, mlflow_uri):
    """A restart between the stage's MLflow writes and its checkpoint replays ``finish``: still one logged
    model and one registry version for the run. A peer's run name ("dml-seed0.peer1") holds a '.', which
    MLflow refuses in a model's name."""
    import torch

    from kdray.data import build_datasets
    from kdray.models import create_model
    from kdray.orchestrator.tracking import REGISTERED_MODEL_TAG, StageLogger

    client = MlflowClient(mlflow_uri)
    exp = client.create_experiment("replay")
    run_id = client.create_run(exp, run_name="dml-seed0.peer1", tags={REGISTERED_MODEL_TAG: "job-distill",
                                                               "kdray.job": "job"}).info.run_id
    splits = build_datasets("digits", train_fraction=0.2)
    weights = create_model("digits_mlp", 10, hidden=8).state_dict()
    spec = {"model": "digits_mlp", "args": {"hidden": 8}, "num_classes": 10}
    example = torch.stack([splits.train[i][0] for i in range(2)])
    for _ in range(2):
        client.update_run(run_id, status="RUNNING")
        StageLogger(mlflow_uri, run_id).finish({"test_top1": 0.5}, [], weights, spec, example=example,
                                                dataset="digits", splits=splits)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert "kdray.model_log_error" not in run.data.tags
    [output] = run.outputs.model_outputs
    assert client.get_logged_model(output.model_id).name == "dml-seed0-peer1"
    assert len(run.inputs.dataset_inputs) == 3
    assert [int(v.version) for v in client.search_model_versions("name = 'job-distill'")] == [1]


def test_sweep_and_existing_experiments_get_the_training_kind(tmp_path, mlflow_uri):
    """Experiments made before kdray tagged them, and a sweep's, open on training runs; a kind someone chose
    explicitly for an experiment stays."""
    from kdray.orchestrator.tracking import mark_training_experiment
    from kdray.search.tracking import SweepTracking

    client = MlflowClient(mlflow_uri)
    old = client.create_experiment("old-kdray")
    chosen = client.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    inferred = client.create_experiment("inferred", tags={"mlflow.experimentKind": "genai_development_inferred"})
    for exp in (old, chosen, inferred):
        mark_training_experiment(client, exp)
    kind = {e: client.get_experiment(e).tags.get("mlflow.experimentKind") for e in (old, chosen, inferred)}
    assert kind == {old: "custom_model_development", chosen: "genai_development",
                    inferred: "custom_model_development"}
    sweep = SweepTracking(mlflow_uri, "sweeps", str(tmp_path / "sweep"), "s")
    assert client.get_experiment(sweep.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_interrupted_sweep_closes_its_runs_through_a_busy_store(tmp_path, mlflow_uri, monkeypatch):
    """Was: one store error while closing (a trial actor still holding SQLite's write lock) was swallowed and
    the sweep run stayed RUNNING. Now the parent is closed first and each write is retried."""
    from kdray.search import tracking as sweep_tracking
    from kdray.search.tracking import SweepTracking

    sweep = SweepTracking(mlflow_uri, "sweeps", str(tmp_path / "sweep"), "s")
    parent = sweep.start(None, {}, {}, resume=False)
    trial = sweep.client.create_run(sweep.experiment_id, tags={"mlflow.parentRunId": parent}).info.run_id
    real, failures = sweep.client.set_terminated, []

    def busy_twice(run_id, status=None, *args):
        if len(failures) < 2:
            failures.append(run_id)
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return real(run_id, status, *args)

    monkeypatch.setattr(sweep.client, "set_terminated", busy_twice)
    monkeypatch.setattr(sweep_tracking, "STORE_RETRY_S", 5.0)
    sweep.fail(KeyboardInterrupt("SIGTERM: Tune stopped the sweep"))
    assert failures == [parent, parent]
    for run_id in (parent, trial):
        run = sweep.client.get_run(run_id)
        assert run.info.status == "KILLED" and "SIGTERM" in run.data.tags["kdray.failure_reason"]
