"""Text jobs as one Ray Train run with 2 CPU workers (DDP over gloo) equal the in-process run.

Data, teachers and student: :mod:`text_corpus` (400 Lee-corpus sentences labelled by whether they hold a digit; tiny
random-weight ``hf_text`` BERTs, the teachers trained once and loaded with ``pretrained: true``, the student from a
saved random directory, so both runs start from the same weights). Dropout is off in the saved configs, and 320
training sentences in global batches of 16 split evenly over the 2 workers (8 + 8: DistributedSampler gives the
in-process batches, and DDP's mean of the two means is the batch mean for per-sample losses: KD, BERT-PKD's [CLS]
MSE). So the runs differ only by float rounding, which AdamW amplifies on parameters whose true gradient is 0
(attention key biases: the softmax ignores a per-query shift; measured up to 6.3e-4 after 60 steps): the band on
weights is 5e-3, on losses (val per epoch, test; measured 4.8e-7) 2e-5, on accuracies one sentence.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import kdray  # noqa: E402
from kdray.models import create_model  # noqa: E402
from text_corpus import digit_corpus, text_job  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # two jobs each, one of them on Ray Train

WEIGHT_BAND, LOSS_BAND = 5e-3, 2e-5
TRAIN = {"epochs": 3, "lr": 0.005, "batch_size": 16, "optimizer": "adamw"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return digit_corpus(tmp_path_factory.mktemp("text_ray"))


def _job(tmp_path, corpus, name, workers, mlflow_uri, teachers, methods):
    return text_job(tmp_path, corpus, name, workers, mlflow_uri, teachers, methods, TRAIN)


def _student_run(uri, result):
    """(state dict, val_loss history, test_loss) of the job's distilled student, from its MLflow run."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    parent = client.get_run(result.parent_run_id)
    (run,) = [r for r in client.search_runs([parent.info.experiment_id],
                                            f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
              if r.info.run_name.endswith("seed0")]
    path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="model/state_dict.pt",
                                               tracking_uri=uri)
    history = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val_loss"), key=lambda m: m.step)]
    return torch.load(path, weights_only=True), history, run.data.metrics["test_loss"]


def _assert_equal_runs(local, on_ray, uri, student_dir):
    (state_a, hist_a, test_a), (state_b, hist_b, test_b) = _student_run(uri, local), _student_run(uri, on_ray)
    diff = max(float((state_a[k].float() - state_b[k].float()).abs().max()) for k in state_a)
    assert diff <= WEIGHT_BAND, f"student weights differ by {diff:.2e}"
    start = create_model("hf_text", 2, path=student_dir).state_dict()
    moved = max(float((state_a[k].float() - start[k].float()).abs().max()) for k in state_a)
    assert moved > 20 * WEIGHT_BAND, f"the student barely trained ({moved:.2e})"
    assert len(hist_a) == len(hist_b) == TRAIN["epochs"]
    assert max(abs(a - b) for a, b in zip(hist_a + [test_a], hist_b + [test_b])) <= LOSS_BAND, (hist_a, hist_b)
    a, b = local.stages[-1], on_ray.stages[-1]
    print(f"max weight difference {diff:.2e}, moved {moved:.2e}, losses {hist_a + [test_a]} vs {hist_b + [test_b]}, "
          f"top-1 {a['test_top1']}/{a['val_top1']} vs {b['test_top1']}/{b['val_top1']}")
    assert abs(a["test_top1"] - b["test_top1"]) <= 1 / 40 + 1e-9 and abs(a["val_top1"] - b["val_top1"]) <= 1 / 40 + 1e-9


def test_two_worker_text_job_equals_in_process(tmp_path, corpus, ray_session, mlflow_uri):
    methods = [{"name": "kd", "alpha": 0.9, "temperature": 2.0}]
    runs = [kdray.distill(_job(tmp_path, corpus, f"text{w}", w, mlflow_uri, corpus["teachers"][:1], methods))
            for w in (0, 2)]
    _assert_equal_runs(*runs, mlflow_uri, corpus["student"])
    assert runs[1].accuracies("distill")[0] >= 0.8  # the majority class is 0.705 of the corpus


def test_two_sharded_text_teachers_on_two_workers_equal_in_process(tmp_path, corpus, ray_session, mlflow_uri):
    """ensemble.shard: true with 2 text teachers (2 and 3 layers) on 2 workers: each worker hosts one, the
    inputs (each worker padded to its own length) and the teachers' logits and hidden states cross between
    them; KD on the combined logits and BERT-PKD per teacher (its [CLS] states cut back per worker)."""
    methods = [{"name": "kd", "alpha": 0.9, "temperature": 2.0}, {"name": "bert_pkd", "beta": 10.0}]
    runs = [kdray.distill(_job(tmp_path, corpus, f"multi{w}", w, mlflow_uri, corpus["teachers"], methods))
            for w in (0, 2)]
    assert runs[1].stages[-1]["methods"] == "kd+bert_pkd"
    _assert_equal_runs(*runs, mlflow_uri, corpus["student"])
