"""Knowledge terms between online peers (in-process): per-link connectors, the 1/(K-1) average, detached
peers, errors naming the peer; and an online job whose every peer gets its own nested MLflow run."""
import pytest
import torch
import torch.nn.functional as F

import kdray
from jobs import digits_job
from kdray.algorithms.base import Batch, create_method
from kdray.algorithms.engine import seed_everything
from kdray.algorithms.response.kd import kl_div_with_temperature
from kdray.algorithms.schemes.online import PeerCohort
from kdray.models import create_model
from kdray.models.features import FeaturePathError


def _peers(widths):
    out = []
    for k, w in enumerate(widths):
        seed_everything(10 + k)
        out.append(create_model("digits_mlp", 10, hidden=w))
    return out


def _batch(n=12):
    g = torch.Generator().manual_seed(1)
    return Batch(torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g), torch.arange(n))


def test_terms_between_three_peers_average_over_the_others():
    peers = _peers((8, 12, 16))
    cohort = PeerCohort(peers, "dml", weight=0.5, temperature=3.0,
                        make_terms=lambda: [create_method("rkd", distance_weight=2.0, angle_weight=0.0)])
    cohort.build(_batch().inputs, num_samples=100)
    assert [sorted(lr.links) for lr in cohort.learners] == [["1", "2"], ["0", "2"], ["0", "1"]]
    batch = _batch()
    _, losses = cohort(batch)
    # peer 0 by hand: CE + 0.5 * mean_j KL_T(p_j || p_0) + mean_j RKD(emb_0, emb_j)
    with torch.no_grad():
        logits = [p(batch.inputs) for p in peers]
        emb = [p.body(batch.inputs.flatten(1)) for p in peers]

    def dist(e):  # distances over distinct pairs, divided by their mean (RKD Eq. 4-5)
        d = torch.cdist(e, e)[~torch.eye(len(e), dtype=torch.bool)]
        return d / d.mean()

    expected_rkd = sum(2.0 * F.smooth_l1_loss(dist(emb[0]), dist(emb[j])) for j in (1, 2)) / 2
    expected_dml = 0.5 * sum(kl_div_with_temperature(logits[0], logits[j], 3.0) for j in (1, 2)) / 2
    assert torch.allclose(losses["peer0_ce"], F.cross_entropy(logits[0], batch.targets), atol=1e-6)
    assert torch.allclose(losses["peer0_dml"], expected_dml, atol=1e-6)
    assert torch.allclose(losses["peer0_rkd_distance"], expected_rkd, atol=1e-5)
    assert losses["peer0_rkd_angle"] == 0
    # peer 0's losses reach peer 0 only (the others are teachers, detached)
    total0 = sum(v for k, v in losses.items() if k.startswith("peer0_"))
    total0.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in peers[0].parameters())
    assert all(p.grad is None for p in [*peers[1].parameters(), *peers[2].parameters()])


def test_each_link_has_its_own_connector_shaped_for_the_teacher_peer():
    cohort = PeerCohort(_peers((8, 12)), make_terms=lambda: [create_method("fitnet", weight=1.0)])
    cohort.build(_batch().inputs)
    shape = lambda learner, j: next(learner.links[j].parameters()).shape  # noqa: E731
    assert tuple(shape(cohort.learners[0], "1"))[:2] == (12, 8)
    assert tuple(shape(cohort.learners[1], "0"))[:2] == (8, 12)


def test_terms_that_include_the_ce_are_refused_between_peers():
    with pytest.raises(ValueError, match="'kd' includes the hard-label CE.*online.mode/weight/temperature"):
        PeerCohort(_peers((8, 8)), make_terms=lambda: [create_method("kd")])


def test_a_missing_feature_point_names_the_peer():
    with pytest.raises(FeaturePathError, match=r"peer 1 \(teacher of peer 0, fitnet\) has no module 'layer9'"):
        PeerCohort(_peers((8, 8)), make_terms=lambda: [create_method("fitnet", teacher_points=["layer9"])])


def test_online_job_with_pkt_between_peers_logs_one_run_per_peer(tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    mlp = lambda h: {"model": "digits_mlp", "args": {"hidden": h}}  # noqa: E731
    cfg = digits_job(tmp_path, mlflow_uri, scheme="online", methods=[{"name": "pkt", "weight": 1.0}],
                     online={"peers": [mlp(16), mlp(24)]}, train__epochs=3, checkpoint__every_epochs=2)
    cfg.pop("teacher")
    result = kdray.distill(cfg)
    row = result.stages[-1]
    assert row["kind"] == "online" and len(row["peer_test_top1"]) == 2 and min(row["peer_test_top1"]) > 0.3
    client = MlflowClient(mlflow_uri)
    stage = client.search_runs([client.get_run(result.parent_run_id).info.experiment_id],
                               f"tags.mlflow.parentRunId = '{result.parent_run_id}'")[0]
    assert stage.info.run_name == "dml-seed0" and "train_peer1_pkt" in stage.data.metrics
    assert "peer_curves.png" in [a.path for a in client.list_artifacts(stage.info.run_id)]
    peers = client.search_runs([stage.info.experiment_id], f"tags.mlflow.parentRunId = '{stage.info.run_id}'")
    assert sorted(p.info.run_name for p in peers) == ["dml-seed0.peer0", "dml-seed0.peer1"]
    for peer in peers:
        k = int(peer.info.run_name[-1])
        assert peer.info.status == "FINISHED" and peer.data.params["model"] == "digits_mlp"
        assert peer.data.metrics["test_top1"] == pytest.approx(row["peer_test_top1"][k])
        assert [m.step for m in client.get_metric_history(peer.info.run_id, "val_top1")] == [0, 1, 2]
        assert "train_pkt" in peer.data.metrics and "train_dml" in peer.data.metrics
        assert "model/state_dict.pt" in [a.path for a in client.list_artifacts(peer.info.run_id, "model")]


def test_output_layout_round_trip_keeps_shapes_and_dtypes():
    from kdray.algorithms.base import ModelOutput
    from kdray.algorithms.packing import OutputLayout

    out = ModelOutput(torch.randn(4, 10), {"stage1": torch.randn(4, 3, 2, 2), "mask": torch.ones(4, 5).half()})
    layout = OutputLayout.of(out, ["stage1", "mask"])
    assert layout.width == 10 + 12 + 5
    flat = layout.pack(out)
    assert flat.shape == (4, 27) and flat.dtype == torch.float32
    back = OutputLayout.from_description(layout.describe()).unpack(torch.nn.functional.pad(flat, (0, 3)))
    assert torch.equal(back.logits, out.logits) and torch.equal(back.features["stage1"], out.features["stage1"])
    assert back.features["mask"].dtype == torch.float16 and torch.equal(back.features["mask"], out.features["mask"])
    with pytest.raises(TypeError, match="feature point 'bad' gives a tuple"):
        OutputLayout.of(ModelOutput(torch.zeros(1, 2), {"bad": (1, 2)}))
