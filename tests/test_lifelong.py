"""Scheme ``lifelong`` (kdray/orchestrator/schemes/lifelong.py, kdray/algorithms/lifelong.py): the LwF and iCaRL
losses and herding against hand-computed values; on digits 0-4 then 5-9, LwF keeps more of task 0 than
fine-tuning and iCaRL more than LwF; the accuracy matrix and its heatmap in MLflow; a run resumed mid-sequence
ends with the uninterrupted weights (the old model and the exemplar memory in the checkpoint); 2 Ray Train
workers; bad task splits are one-line errors before training."""
from __future__ import annotations

import math
import statistics

import pytest
import torch

import kdray
from jobs import digits_job
from kdray.algorithms.lifelong import (average_accuracy, class_means, forgetting, herding, icarl_loss, lwf_loss,
                                       nme_predict)
from kdray.config import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def lifelong_job(tmp_path, mlflow_uri=None, lifelong=None, **over):
    """The whole digits training split, a 16-wide MLP, 20 epochs per task at SGD lr 0.1."""
    over = {"name": "ll", "scheme": "lifelong", "train__epochs": 20, "train__lr": 0.1, **over}
    cfg = digits_job(tmp_path, mlflow_uri, **over)
    del cfg["teacher"], cfg["methods"]
    cfg["data"]["options"] = {}
    cfg["lifelong"] = lifelong or {}
    return cfg


# --- the mathematics on fixed tensors -------------------------------------------------------------------------
def test_lwf_loss_is_the_softened_cross_entropy_on_the_old_classes():
    logits = torch.tensor([[1.0, 2.0, 0.0]])
    old = torch.tensor([[2.0, 0.0, 5.0]])  # class 2 is new: ignored
    # T = 2: old model's softened probabilities softmax([1, 0]); the model's log-softmax([0.5, 1.0])
    p = [math.exp(1) / (math.exp(1) + 1), 1 / (math.exp(1) + 1)]
    lse = math.log(math.exp(0.5) + math.exp(1.0))
    expected = -(p[0] * (0.5 - lse) + p[1] * (1.0 - lse))  # = 0.83961
    assert lwf_loss(logits, old, torch.tensor([0, 1]), temperature=2.0).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.83961, abs=1e-5)
    # a batch is the mean of its rows
    two = lwf_loss(torch.cat([logits, logits]), torch.cat([old, old]), torch.tensor([0, 1]), 2.0)
    assert two.item() == pytest.approx(expected, abs=1e-6)


def test_icarl_loss_is_bce_with_old_model_sigmoid_targets_on_the_old_classes():
    logits = torch.tensor([[0.0, 1.0, -1.0, 3.0]])
    targets = torch.tensor([2])  # new class 2; classes 0, 1 old; class 3 not seen (left out)
    seen = torch.tensor([True, True, True, False])
    old = torch.tensor([[2.0, -2.0, 9.0, 9.0]])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    bce = lambda x, y: math.log(1 + math.exp(x)) - x * y  # noqa: E731
    expected = bce(0.0, sig(2.0)) + bce(1.0, sig(-2.0)) + bce(-1.0, 1.0)  # 0.69315 + 1.19406 + 1.31326
    got = icarl_loss(logits, targets, seen, old, torch.tensor([0, 1])).item()
    assert got == pytest.approx(expected, abs=1e-6) and expected == pytest.approx(3.20047, abs=1e-5)
    # the first task (no old model): one-hot targets only
    first = icarl_loss(logits, targets, seen, None, torch.zeros(0, dtype=torch.long)).item()
    assert first == pytest.approx(bce(0.0, 0) + bce(1.0, 0) + bce(-1.0, 1), abs=1e-6)


def test_herding_picks_the_samples_whose_running_mean_tracks_the_class_mean():
    # normalised: (1,0) (0,1) (.7071,.7071) (1,0); mean mu = (0.6768, 0.4268)
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, 0.0]])
    # k=1: |mu - phi| = 0.535, 0.887, 0.282, 0.535 -> 2
    # k=2: |mu - (phi2 + phi)/2| = 0.191 (0 and 3 tie: the lower index), 0.535 -> 0
    # k=3: |mu - (phi2 + phi0 + phi)/3| = 0.178 (1), 0.296 (3) -> 1; then 3
    assert herding(feats, 3).tolist() == [2, 0, 1]
    assert herding(feats, 10).tolist() == [2, 0, 1, 3]  # at most every sample, once


def test_nearest_mean_of_exemplars_uses_normalised_class_means():
    feats = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 1.0]])
    labels = torch.tensor([7, 3, 3, 7])
    means = class_means(feats, labels, [3, 7])
    # class 3: (0,1) and (0,1) -> (0,1); class 7: (1,0) and (.7071,.7071) -> mean (.8536,.3536) -> (.9239,.3827)
    assert torch.allclose(means, torch.tensor([[0.0, 1.0], [0.92388, 0.38268]], dtype=torch.float64), atol=1e-5)
    # (1,2) normalised (.447,.894): nearer (0,1) (0.526) than (.924,.383) (0.700); (5,1) nearer class 7
    assert nme_predict(torch.tensor([[1.0, 2.0], [5.0, 1.0]]), means, [3, 7]).tolist() == [3, 7]


def test_average_accuracy_and_forgetting_of_a_fixed_matrix():
    acc = torch.tensor([[0.9, 0.0, 0.0], [0.7, 0.8, 0.0], [0.5, 0.6, 0.9]])
    assert average_accuracy(acc) == pytest.approx(2.0 / 3)
    assert forgetting(acc) == pytest.approx(((0.9 - 0.5) + (0.8 - 0.6)) / 2)
    assert forgetting(acc[:1, :1]) == 0.0


# --- the scheme -----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_lwf_keeps_more_of_task_0_than_finetuning_and_icarl_more_than_lwf(tmp_path):
    """Digits 0-4 then 5-9, digits_mlp (16 hidden), 20 epochs per task, SGD lr 0.1, iCaRL 20 herded exemplars a
    class; seeds 0, 1, 2. Task-0 test accuracy after task 1, measured (torch 2.14.1 CPU): finetune 0.534, LwF
    0.679, iCaRL 0.962 (accuracy on task 0 after task 0: 0.99 for all). The margins sit at half the measured
    gaps (0.145 -> 0.07, 0.283 -> 0.14)."""
    result = kdray.distill(lifelong_job(tmp_path, seeds=[0, 1, 2]))
    matrices = {m: [s["accuracy_matrix"] for s in result.stages if s["kind"] == m] for m in ("finetune", "lwf", "icarl")}
    mean = {m: torch.tensor(v).mean(dim=0) for m, v in matrices.items()}  # the matrices' means over seeds
    for m, acc in mean.items():
        avg = statistics.mean(s["average_accuracy"] for s in result.stages if s["kind"] == m)
        fgt = statistics.mean(s["forgetting"] for s in result.stages if s["kind"] == m)
        print(f"{m}: mean matrix {[[round(v, 3) for v in row] for row in acc.tolist()]} average {avg:.3f} "
              f"forgetting {fgt:.3f}")
    old = {m: float(acc[1, 0]) for m, acc in mean.items()}
    assert all(float(acc[0, 0]) > 0.9 for acc in mean.values())  # each learnt task 0
    assert old["lwf"] > old["finetune"] + 0.07, old
    assert old["icarl"] > old["lwf"] + 0.14, old
    nme = torch.tensor([s["nme_accuracy_matrix"] for s in result.stages if s["kind"] == "icarl"]).mean(dim=0)
    print(f"icarl nearest-mean-of-exemplars: mean matrix {[[round(v, 3) for v in row] for row in nme.tolist()]}")
    assert float(nme[1, 0]) > old["lwf"] + 0.14, nme  # measured 0.949


def test_matrix_metrics_and_heatmap_are_in_the_stages_mlflow_run(tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient
    from PIL import Image

    cfg = lifelong_job(tmp_path, mlflow_uri, train__epochs=2, lifelong={"methods": ["lwf"]})
    result = kdray.distill(cfg)
    [row] = result.stages
    client = MlflowClient(mlflow_uri)
    [run] = client.search_runs([client.get_run(result.parent_run_id).info.experiment_id],
                               "attributes.run_name = 'lwf-seed0'")
    metrics = run.data.metrics
    for t in (0, 1):
        for j in (0, 1):
            [entry] = client.get_metric_history(run.info.run_id, f"acc_task{j}_after{t}")
            assert entry.step == 2 * t + 1  # the last epoch of task t
            assert entry.value == pytest.approx(row["accuracy_matrix"][t][j])
    assert row["accuracy_matrix"][0][1] == 0.0 and row["accuracy_matrix"][0][0] > 0.5  # task 1 not learnt yet
    assert metrics["average_accuracy"] == pytest.approx(statistics.mean(row["accuracy_matrix"][1]))
    assert metrics["forgetting"] == pytest.approx(row["accuracy_matrix"][0][0] - row["accuracy_matrix"][1][0])
    assert "accuracy_matrix.png" in [f.path for f in client.list_artifacts(run.info.run_id)]
    path = client.download_artifacts(run.info.run_id, "accuracy_matrix.png", str(tmp_path))
    assert min(Image.open(path).size) > 100


class Record:
    """Epoch callback keeping the model's weights after each epoch of the iCaRL stage (in-process)."""

    def __init__(self, stop_after: int | None = None):
        self.states, self.stop_after = {}, stop_after

    def on_epoch_end(self, epoch, metrics, loop):
        self.states[epoch] = {k: v.clone() for k, v in loop.student.state_dict().items()}
        if epoch == self.stop_after:
            raise KeyboardInterrupt


def test_resumed_mid_sequence_run_ends_with_the_uninterrupted_weights(tmp_path):
    over = dict(train__epochs=2, checkpoint__every_epochs=1,
                lifelong={"methods": ["icarl"], "exemplars_per_class": 5})
    whole = Record()
    kdray.distill(lifelong_job(tmp_path, name="whole", **over), callbacks=[whole])
    cut = Record(stop_after=2)  # the first epoch of task 1: exemplars chosen, task 0's model frozen
    with pytest.raises(KeyboardInterrupt):
        kdray.distill(lifelong_job(tmp_path, name="cut", **over), callbacks=[cut])
    saved = torch.load(tmp_path / "runs" / "cut" / "checkpoint" / "state.pt", weights_only=True)
    state = saved["loop"]["lifelong"]
    assert int(state["task"]) == 1 and state["memory"].shape == (25,)  # 5 exemplars of each of classes 0-4
    assert "fc.weight" in state["old_model"]
    resumed = Record()
    kdray.distill(lifelong_job(tmp_path, name="cut", **over), callbacks=[resumed], resume=True)
    assert sorted(resumed.states) == [3]
    for key, value in whole.states[3].items():
        assert torch.equal(value, resumed.states[3][key]), key
    assert not torch.equal(whole.states[1]["fc.weight"], whole.states[3]["fc.weight"])


class PerRank:
    """Epoch callback run on each Ray Train worker: saves its rank's exemplar memory, old model and model."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_epoch_end(self, epoch, metrics, loop):
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        state = loop.state_dict()["lifelong"]
        torch.save({"memory": state["memory"], "old": state.get("old_model", {}),
                    "model": {k: v.cpu() for k, v in loop.student.state_dict().items()}},
                   f"{self.folder}/rank{rank}-epoch{epoch}.pt")


@pytest.mark.ray
def test_two_ray_train_workers_run_the_sequence_with_one_memory(tmp_path, ray_session):
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    folder = tmp_path / "ranks"
    folder.mkdir()
    cfg = lifelong_job(tmp_path, ray__num_workers=2, train__epochs=3, checkpoint__every_epochs=3,
                       lifelong={"methods": ["icarl"], "exemplars_per_class": 10})
    [row] = kdray.distill(cfg, callbacks=[PerRank(str(folder))]).stages
    acc = row["accuracy_matrix"]
    assert acc[0][0] > 0.8 and acc[1][1] > 0.5 and acc[1][0] > 0.5, acc  # task 0 kept by the replay
    a, b = (torch.load(folder / f"rank{r}-epoch4.pt", weights_only=True) for r in (0, 1))
    assert a["memory"].shape == (50,) and torch.equal(a["memory"], b["memory"])  # rank 0's picks on both
    for part in ("old", "model"):
        assert a[part] and all(torch.allclose(v, b[part][k]) for k, v in a[part].items()), part


@pytest.mark.parametrize("tasks, pattern", [
    ([[0, 1, 2], [3, 12]], r"^lifelong.tasks: task 1 names class 12, but dataset 'digits' has classes 0 \.\. 9; "
                           r"name only labels the dataset has$"),
    ([[0, 1, 2], [2, 3]], r"^lifelong.tasks: class 2 is in tasks 0 and 1; class-incremental tasks must not overlap"),
])
def test_bad_task_splits_fail_in_one_line_before_training(tmp_path, tasks, pattern):
    with pytest.raises(ConfigError, match=pattern) as err:
        kdray.distill(lifelong_job(tmp_path, lifelong={"tasks": tasks}))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "runs" / "ll").exists() or not any((tmp_path / "runs" / "ll").rglob("*.pt"))


def test_methods_belong_in_the_lifelong_section(tmp_path):
    cfg = {**lifelong_job(tmp_path), "methods": [{"name": "kd"}]}
    with pytest.raises(ConfigError, match=r"scheme 'lifelong' takes its methods from lifelong.methods"):
        kdray.distill(cfg)


@pytest.mark.ray
def test_lwf_knobs_are_searchable_without_a_teacher(tmp_path, ray_session):
    """``kdray sweep`` over LwF's ``lambda_old`` and ``temperature``: the scheme has no teacher to train first,
    each trial runs the task sequence, its objective is the swept method's (the last of ``lifelong.methods``)
    val top-1, and the sampled knobs reach each trial's job."""
    import json
    import os

    from kdray.orchestrator.checkpoints import LocalCheckpoints

    base = lifelong_job(tmp_path, train__epochs=2, lifelong={"methods": ["lwf"], "exemplars_per_class": 2})
    space = {"lifelong.lambda_old": {"float": [0.5, 2.0]}, "lifelong.temperature": {"float": [1.0, 4.0]}}
    result = kdray.sweep(space, base, num_samples=2, asha=False, name="ll-sweep", output_dir=str(tmp_path / "out"),
                         verbose=0, log=lambda m: None)
    assert len(result.trials) == 2 and (result.trials["status"] == "complete").all(), result.trials
    for _, row in result.trials.iterrows():
        [stage] = LocalCheckpoints(row["run_dir"]).latest()["done"].values()
        assert stage["kind"] == "lwf" and row["val_top1"] == pytest.approx(stage["val_top1"])
        job = json.loads(open(os.path.join(row["run_dir"], "config.json")).read())
        assert job["lifelong"]["lambda_old"] == pytest.approx(row["lifelong.lambda_old"])
