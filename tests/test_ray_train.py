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
