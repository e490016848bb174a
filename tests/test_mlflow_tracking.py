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
