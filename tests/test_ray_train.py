"""The same job as one Ray Train run with 2 CPU workers (DDP over gloo) reaches the in-process band."""
import signal

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
    # TorchTrainer.fit() runs Tune, which leaves its Ctrl-C handler installed: kdray puts Python's back
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
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


def test_sharded_teachers_on_two_workers_match_in_process(tmp_path, ray_session):
    """A teacher-sharded ensemble with KD + FitNet (one connector per teacher; features exchanged between
    the workers) as one Ray Train run (peer-parallel online: the four-worker test below)."""
    t = {"model": "digits_mlp", "args": {"hidden": 32}, "train": {"epochs": 4, "batch_size": 32}}
    over = dict(scheme="multi_teacher", teachers=[t, {**t, "args": {"hidden": 24}}], train__epochs=4,
                checkpoint__every_epochs=4,
                methods=[{"name": "kd", "alpha": 0.9, "temperature": 4.0}, {"name": "fitnet", "weight": 1.0}])
    runs = []
    for workers in (0, 2):
        cfg = digits_job(tmp_path, name=f"multi{workers}", ray__num_workers=workers, **over)
        cfg.pop("teacher")
        runs.append(kdray.distill(cfg))
    local, ray2 = runs
    assert ray2.stages[-1]["methods"] == "kd+fitnet"
    a, b = local.accuracies("distill")[0], ray2.accuracies("distill")[0]
    assert abs(a - b) <= 0.03, (a, b)


def test_replicated_peers_with_a_feature_term_on_four_workers(tmp_path, ray_session, mlflow_uri):
    """2 peers x 2 data-parallel replicas (4 Ray Train workers), PKT between the peers: reaches the
    in-process band and logs one nested MLflow run per peer."""
    from mlflow.tracking import MlflowClient

    mlp = lambda h: {"model": "digits_mlp", "args": {"hidden": h}}  # noqa: E731
    over = dict(scheme="online", methods=[{"name": "pkt", "weight": 1.0}], online={"peers": [mlp(16), mlp(24)]},
                train__epochs=4, checkpoint__every_epochs=2)
    runs = []
    for workers, uri in ((0, None), (4, mlflow_uri)):
        cfg = digits_job(tmp_path, uri, name=f"grid{workers}", ray__num_workers=workers, **over)
        cfg.pop("teacher")
        runs.append(kdray.distill(cfg))
    local, grid = (r.stages[-1]["peer_test_top1"] for r in runs)
    assert all(abs(a - b) <= 0.05 for a, b in zip(local, grid)), (local, grid)
    client = MlflowClient(mlflow_uri)
    stage_id = runs[1].stages and client.search_runs(
        [client.get_run(runs[1].parent_run_id).info.experiment_id],
        f"tags.mlflow.parentRunId = '{runs[1].parent_run_id}'")[0].info.run_id
    peers = client.search_runs([client.get_run(stage_id).info.experiment_id],
                               f"tags.mlflow.parentRunId = '{stage_id}'")
    assert sorted(p.info.run_name for p in peers) == ["dml-seed0.peer0", "dml-seed0.peer1"]
    for peer in peers:  # rank 0 logged both peers (peer 1 lives on ranks 1 and 3)
        assert [m.step for m in client.get_metric_history(peer.info.run_id, "val_top1")] == [0, 1, 2, 3]
        assert peer.data.metrics["test_top1"] == pytest.approx(grid[int(peer.info.run_name[-1])])


def test_sync_batchnorm_without_gpus_is_refused_before_training(tmp_path, ray_session):
    """torch's SyncBatchNorm runs on CUDA only: on a CPU cluster the option fails in one line, up front."""
    from kdray.config import ConfigError

    cfg = digits_job(tmp_path, name="syncbn", ray__num_workers=2, ray__sync_batchnorm=True)
    with pytest.raises(ConfigError, match=r"ray.sync_batchnorm needs GPU workers .* has 0 GPU\(s\) for 2 workers"):
        kdray.distill(cfg)
    assert not (tmp_path / "runs" / "syncbn" / "checkpoint").exists()
