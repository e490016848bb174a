"""Scheme ``lm`` (kdray/orchestrator/schemes/lm.py) on the ``lm_text`` corpus (kdray/data/lm_corpus.py): packed
windows split by document, the plan, one-line errors before training, a job's rows and MLflow records (per-step
token losses, per-epoch held-out figures, generations, the perplexity plot), exact resume, several teachers with
on-policy batches, 2 Ray Train workers, and ``kdray sweep`` over the LM settings."""
from __future__ import annotations

import copy
import math
import sys

import pytest
import torch

import kdray
from kdray.config import Config, ConfigError
from kdray.data import build_datasets
from kdray.orchestrator.plan import plan_stages
from jobs import with_overrides

pytestmark = pytest.mark.usefixtures("one_thread")

ADAM = {"optimizer": "adamw", "lr": 0.003, "batch_size": 32}
TINY = {"layers": 1, "width": 32, "heads": 4, "max_length": 32}


def lm_job(tmp_path, epochs=2, teacher_epochs=2, **over) -> dict:
    cfg = {"name": "lm", "output_dir": str(tmp_path / "runs"), "scheme": "lm",
           "data": {"name": "lm_text", "options": {"seq_len": 32, "max_windows": 256}},
           "teacher": {"model": "causal_lm", "args": TINY, "train": {"epochs": teacher_epochs, **ADAM}},
           "student": {"model": "causal_lm", "args": {**TINY, "width": 16}},
           "train": {"epochs": epochs, **ADAM}, "lm": {"loss": "forward_kl", "log_every_steps": 2},
           "seeds": [0], "baseline": True, "ray": {"num_workers": 0}, "mlflow": {"enabled": False}}
    return with_overrides(cfg, **over)


def test_windows_pack_each_split_s_documents_and_decode_back(tmp_path):
    docs = [f"document {i} says {'ab' * (i + 3)}" for i in range(10)]
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(docs) + "\n")
    splits = build_datasets("lm_text", path=str(corpus), seq_len=8, val_fraction=0.2, test_fraction=0.1)
    assert splits.num_classes == len(set("".join(docs)) | {"\n"}) and splits.input_shape == (8,)
    assert splits.train.windows.shape[1] == 8 and splits.train.windows.dtype == torch.long
    train_text = "".join(splits.decode(w) for w in splits.train.windows)
    val_text = "".join(splits.decode(w) for w in splits.val.windows)
    assert train_text == "\n".join(docs[:7])[: len(train_text)] and len(train_text) == len("\n".join(docs[:7])) // 8 * 8
    assert val_text == "\n".join(docs[7:9])[: len(val_text)]  # held-out windows hold held-out documents only
    assert "document 9" in splits.decode(splits.test.windows.flatten()) and "document 7" not in train_text
    ids, label, index = splits.train[1]
    assert torch.equal(ids, splits.train.windows[1]) and (label, index) == (0, 1)


@pytest.mark.parametrize("options,pattern", [
    ({"seq_len": 1}, "seq_len must be >= 2"),
    ({"path": "/nowhere/corpus.txt"}, "is not a file"),
    ({"val_fraction": 0.5, "test_fraction": 0.5}, "must leave training documents"),
])
def test_bad_corpus_options_fail_in_one_line(options, pattern):
    with pytest.raises((ValueError, FileNotFoundError), match=pattern):
        build_datasets("lm_text", **options)


def test_plan_trains_the_teacher_once_then_ce_and_the_taught_student_per_seed(tmp_path):
    stages = plan_stages(Config.model_validate(lm_job(tmp_path, seeds=[0, 1], lm__loss="jsd")))
    assert [(s.name, s.kind, s.methods) for s in stages] == [
        ("teacher", "lm_teacher", None), ("ce-seed0", "lm_scratch", "ce"), ("jsd-seed0", "lm_distill", "jsd"),
        ("ce-seed1", "lm_scratch", "ce"), ("jsd-seed1", "lm_distill", "jsd")]
    assert all(str(t) == "stage:teacher" for s in stages[1:] for t in s.teachers)


def _teacher_checkpoint(tmp_path, vocab):
    from kdray.models import create_model

    path = tmp_path / "teacher.pt"
    torch.save(create_model("causal_lm", vocab, **TINY).state_dict(), path)
    return str(path)


@pytest.mark.parametrize("over,pattern", [
    (dict(lm__on_policy_lambda=0.5), "set lm.prompt_tokens >= 1"),
    (dict(lm__combine="weights", lm__weights=[1.0, 2.0]), "one weight per teacher"),
    (dict(data={"name": "digits"}), "trains on token windows"),
    (dict(student={"model": "digits_mlp"}), "student 'digits_mlp' is not one"),
    (dict(lm__prompt_tokens=31), "leaves no target"),
    (dict(lm__loss="kl"), "lm.loss"),
])
def test_bad_lm_configs_fail_in_one_line_before_training(tmp_path, over, pattern):
    with pytest.raises(ConfigError, match=pattern) as err:
        kdray.distill(lm_job(tmp_path, **over), quiet=True, log=lambda *a: None)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "runs").exists()  # a refused job writes nothing


def test_a_teacher_of_another_vocabulary_is_refused_naming_both(tmp_path):
    checkpoint = _teacher_checkpoint(tmp_path, 40)
    cfg = lm_job(tmp_path, teacher={"model": "causal_lm", "args": TINY, "checkpoint": checkpoint})
    with pytest.raises(ConfigError, match=r"teacher.checkpoint .*embed.weight.* \(40, 32\) .* \(55, 32\)") as err:
        kdray.distill(cfg, quiet=True, log=lambda *a: None)
    assert "\n" not in str(err.value)


def test_a_job_reports_perplexities_and_logs_steps_epochs_generations_and_a_plot(tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    result = kdray.distill(lm_job(tmp_path, mlflow={"tracking_uri": mlflow_uri}, lm__generations=2),
                           quiet=True, log=lambda *a: None)
    rows = {s["name"]: s for s in result.stages}
    assert set(rows) == {"teacher", "ce-seed0", "forward_kl-seed0"}
    vocab = rows["teacher"]["vocab_size"]
    assert vocab == 55
    for name in ("ce-seed0", "forward_kl-seed0"):
        row = rows[name]
        assert 1 < row["test_perplexity"] < vocab * 1.5 and 0 <= row["test_top1"] <= 1
        # the teacher's floor: cross-entropy under the teacher is at least its entropy
        assert row["test_perplexity_under_teacher"] >= 1.0 and row["teacher_test_perplexity"] < vocab
    assert rows["teacher"]["test_perplexity"] < vocab  # trained below uniform
    client = MlflowClient(mlflow_uri)
    parent = client.get_run(result.parent_run_id)
    runs = {r.info.run_name: r for r in client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    kd = runs["forward_kl-seed0"]
    steps = [m.step for m in client.get_metric_history(kd.info.run_id, "step_lm_forward_kl")]
    assert steps == list(range(2, 2 * len(steps) + 1, 2)) and len(steps) >= 8  # 256 windows / 32 x 2 epochs
    per_epoch = client.get_metric_history(kd.info.run_id, "val_perplexity_under_teacher")
    assert [m.step for m in per_epoch] == [0, 1]
    assert kd.data.metrics["test_perplexity_under_teacher"] == pytest.approx(
        rows["forward_kl-seed0"]["test_perplexity_under_teacher"])
    files = {a.path for a in client.list_artifacts(kd.info.run_id, "generations")}
    assert files == {"generations/epoch_0001.txt", "generations/epoch_0002.txt"}
    text = open(client.download_artifacts(kd.info.run_id, "generations/epoch_0002.txt", str(tmp_path))).read()
    assert text.count(" | ") == 2  # two prompts, each with its sampled continuation
    assert "lm_perplexity.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_a_transformers_llama_student_learns_from_a_causal_lm_teacher(tmp_path):
    """``hf_causal_lm`` (a transformers Llama built from size knobs, random weights) as the student of the plain
    PyTorch teacher: the vocabulary is the corpus's for both, the taught student ends below uniform perplexity."""
    student = {"model": "hf_causal_lm", "args": {"arch": "llama", "layers": 1, "hidden": 32, "heads": 4,
                                                   "max_length": 32, "seed": 0}}
    result = kdray.distill(lm_job(tmp_path, baseline=False, student=student, lm__generations=1,
                                  data__options__max_windows=128), quiet=True, log=lambda *a: None)
    row = {s["name"]: s for s in result.stages}["forward_kl-seed0"]
    assert row["vocab_size"] == 55 and row["test_perplexity"] < 55


class StudentWeights:
    """The taught student's weights after each epoch."""

    def __init__(self, stop_after=None):
        self.stop_after, self.states = stop_after, {}

    def on_epoch_end(self, epoch, metrics, loop):
        if metrics["kind"] != "lm_distill":
            return
        self.states[epoch] = copy.deepcopy(loop.state_dict()["student"])
        if epoch == self.stop_after:
            raise KeyboardInterrupt


def test_resume_gives_the_uninterrupted_weights(tmp_path):
    """Stopped after the taught student's 2nd epoch (of 4) and resumed: bit-exact weights, on-policy draws
    included (their generator is in the checkpoint)."""
    over = dict(epochs=4, baseline=False, checkpoint={"every_epochs": 1}, lm__on_policy_lambda=0.5,
                lm__prompt_tokens=8, lm__generations=0, data__options__max_windows=96)
    whole = StudentWeights()
    kdray.distill(lm_job(tmp_path / "whole", **over), callbacks=[whole], quiet=True, log=lambda *a: None)
    cfg = lm_job(tmp_path / "cut", **over)
    with pytest.raises(KeyboardInterrupt):
        kdray.distill(cfg, callbacks=[StudentWeights(stop_after=1)], quiet=True, log=lambda *a: None)
    resumed = StudentWeights()
    kdray.distill(cfg, resume=True, callbacks=[resumed], quiet=True, log=lambda *a: None)
    assert sorted(resumed.states) == [2, 3]
    for key, value in whole.states[3].items():
        torch.testing.assert_close(resumed.states[3][key], value, rtol=0, atol=0, msg=key)


def test_two_teachers_combined_per_token_with_on_policy_batches(tmp_path):
    """``teachers: [a, b]`` (each trained on CE first) combined by per-token confidence, GKD's lambda 1 (every
    batch the student's samples) with JSD: the job runs and the student is scored under the first teacher."""
    teacher = {"model": "causal_lm", "args": TINY, "train": {"epochs": 1, **ADAM}}
    cfg = lm_job(tmp_path, epochs=1, baseline=False, teachers=[teacher, {**teacher, "args": {**TINY, "width": 16}}],
                 lm__loss="jsd", lm__combine="confidence", lm__on_policy_lambda=1.0, lm__prompt_tokens=16,
                 data__options__max_windows=64)
    del cfg["teacher"]
    result = kdray.distill(cfg, quiet=True, log=lambda *a: None)
    rows = {s["name"]: s for s in result.stages}
    assert set(rows) == {"teacher-0", "teacher-1", "jsd-seed0"}
    assert rows["jsd-seed0"]["teachers"] == ["stage:teacher-0", "stage:teacher-1"]
    assert math.isfinite(rows["jsd-seed0"]["test_perplexity_under_teacher"])


@pytest.mark.ray
def test_two_ray_train_workers_with_sharded_teachers_train_the_one_process_student(tmp_path, ray_session):
    """``ray.num_workers: 2`` with two teachers and ``lm.shard_teachers``: each worker takes half of every global
    batch, teacher m lives on worker m only and sends each worker the log-probs of its rows, DDP averages the
    gradients (equal token counts per rank): the test figures equal the one-process run's, whose teachers are
    combined in one process, within float summation order (rel 1e-4)."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    teacher = {"model": "causal_lm", "args": TINY, "train": {"epochs": 1, **ADAM}}
    over = dict(baseline=False, lm__generations=0, data__options__max_windows=128, train__optimizer="sgd",
                train__lr=0.5, teachers=[teacher, {**teacher, "args": {**TINY, "width": 16}}],
                lm__combine="confidence", lm__shard_teachers=True)
    one, two = lm_job(tmp_path / "one", **over), lm_job(tmp_path / "two", ray={"num_workers": 2}, **over)
    for cfg in (one, two):
        del cfg["teacher"]
    a, b = ({s["name"]: s for s in kdray.distill(cfg, quiet=True, log=lambda *a: None).stages}["forward_kl-seed0"]
            for cfg in (one, two))
    for key in ("test_perplexity", "test_perplexity_under_teacher", "teacher_test_perplexity"):
        assert b[key] == pytest.approx(a[key], rel=1e-4), key
    assert b["teachers_on_worker"] == 1 and "teachers_on_worker" not in a  # worker 0 held one of the two


@pytest.mark.ray
def test_kdray_cache_writes_the_teacher_top_k_and_students_train_from_it_without_the_teacher(tmp_path, ray_session):
    """``kdray cache`` of an lm job (Ray Data) writes the teacher's top-8 on the training windows; a job with
    ``lm.topk_cache`` then trains the student without building the teacher, close to live top-8 training (the
    cache holds float16 log-probs: test perplexity within 1e-3), reports bytes per token, and a cache of
    other teacher weights is refused in one line."""
    from kdray.orchestrator.teacher_cache import write_cache

    cache = str(tmp_path / "topk.parquet")
    over = dict(baseline=False, lm__generations=0, lm__top_k=8, data__options__max_windows=96,
                teacher={"model": "causal_lm", "args": TINY, "checkpoint": _teacher_checkpoint(tmp_path, 55)})
    summary = write_cache(lm_job(tmp_path, lm__topk_cache=cache, **over), log=lambda *a: None)
    assert summary["k"] == 8 and summary["sequences"] == 96 and summary["tokens"] == 96 * 32
    assert 2 < summary["bytes_per_token"] < 8 * 6 * 1.1  # at most an int32 id + a float16 value per kept token
    rows = [{s["name"]: s for s in kdray.distill(lm_job(tmp_path / name, **over, **extra), quiet=True,
                                                 log=lambda *a: None).stages}["forward_kl-seed0"]
            for name, extra in (("live", {}), ("cached", {"lm__topk_cache": cache}))]
    live, cached = rows
    assert cached["test_perplexity"] == pytest.approx(live["test_perplexity"], rel=1e-3)
    assert "teacher_test_perplexity" in live and "teacher_test_perplexity" not in cached  # no teacher was built
    other = lm_job(tmp_path / "stale", lm__topk_cache=cache, **over)
    torch.save({k: v + 0.01 for k, v in torch.load(other["teacher"]["checkpoint"]).items()},
               tmp_path / "other.pt")
    other["teacher"]["checkpoint"] = str(tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="lm.topk_cache: .*fingerprint") as err:
        kdray.distill(other, quiet=True, log=lambda *a: None)
    assert "\n" not in str(err.value)


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_searches_the_lm_settings_and_the_student_size(tmp_path, ray_session):
    """``kdray sweep`` over GKD's beta and lambda, the temperature, top-k and the student's width: the base trains
    the teacher once; each trial's taught student is scored by its held-out next-token top-1."""
    from kdray.orchestrator.checkpoints import LocalCheckpoints

    base = lm_job(tmp_path, epochs=1, baseline=False, lm__loss="jsd", lm__generations=0,
                  data__options__max_windows=64, lm__prompt_tokens=8)
    space = {"lm.beta": {"float": [0.1, 0.9]}, "lm.on_policy_lambda": {"float": [0.0, 0.5]},
             "lm.temperature": {"choice": [1.0, 2.0]},
             "lm.top_k": {"choice": [4, 16]}, "student.args.width": {"choice": [8, 16]}}
    result = kdray.sweep(space, base, num_samples=2, asha=False, name="lm-sweep", output_dir=str(tmp_path / "out"),
                         verbose=0, log=lambda m: None)
    assert len(result.trials) == 2 and (result.trials["status"] == "complete").all(), result.trials
    for _, row in result.trials.iterrows():
        [stage] = LocalCheckpoints(row["run_dir"]).latest()["done"].values()
        assert stage["kind"] == "lm_distill" and row["val_top1"] == pytest.approx(stage["val_top1"])
        assert 0 < stage["val_top1"] < 1
