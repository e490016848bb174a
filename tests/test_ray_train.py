"""The same job as one Ray Train run with 2 CPU workers (DDP over gloo) reaches the in-process band."""
import pytest

import kdray
from jobs import digits_job

pytestmark = pytest.mark.ray


def test_two_worker_job_matches_in_process_band(tmp_path, ray_session, mlflow_uri):
    common = dict(seeds=[0], baseline=False, teacher__train__epochs=15, train__epochs=15, checkpoint__every_epochs=5)
    local = kdray.distill(digits_job(tmp_path, name="local", **common))
    on_ray = kdray.distill(digits_job(tmp_path, mlflow_uri, name="ray2", ray__num_workers=2, **common))
    for kind in ("teacher", "distill"):
        a, b = local.accuracies(kind)[0], on_ray.accuracies(kind)[0]
        assert abs(a - b) <= 0.04, (kind, a, b)
    assert on_ray.accuracies("distill")[0] > 0.85
    # rank 0 logged into the driver's runs: the job run is finished and its stages hold epoch metrics
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    parent = client.get_run(on_ray.parent_run_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{on_ray.parent_run_id}'")
    assert {c.info.run_name for c in children} == {"teacher", "kd-seed0"}
    for child in children:
        history = client.get_metric_history(child.info.run_id, "val_top1")
        assert sorted(m.step for m in history) == list(range(15))


def test_schemes_on_two_workers_match_in_process(tmp_path, ray_session):
    """Peer-parallel DML (one peer per worker) and a teacher-sharded ensemble, each one Ray Train run."""
    cnn = {"model": "digits_cnn", "args": {"width": 4}}
    online = dict(scheme="online", methods=[], online={"peers": [cnn, cnn]}, train__epochs=4,
                  checkpoint__every_epochs=4)
    t = {"model": "digits_mlp", "args": {"hidden": 32}, "train": {"epochs": 4, "batch_size": 32}}
    multi = dict(scheme="multi_teacher", teachers=[t, {**t, "args": {"hidden": 24}}], train__epochs=4,
                 checkpoint__every_epochs=4)
    for label, over in (("online", online), ("multi", multi)):
        runs = []
        for workers in (0, 2):
            cfg = digits_job(tmp_path, name=f"{label}{workers}", ray__num_workers=workers, **over)
            cfg.pop("teacher")
            runs.append(kdray.distill(cfg))
        local, ray2 = runs
        last = local.stages[-1]["kind"]
        a, b = local.accuracies(last)[0], ray2.accuracies(last)[0]
        assert abs(a - b) <= 0.03, (label, a, b)
        if label == "online":
            assert len(ray2.stages[-1]["peer_test_top1"]) == 2
