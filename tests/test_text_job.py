"""Text jobs through kdray.distill: a pretrained teacher directory, a student from the teacher's layers or
from size knobs, classification / masked-LM / sentence-embedding tasks, the save_pretrained directory logged
to MLflow and loaded back with from_pretrained, a vocabulary mismatch refused before training."""
import pytest
import torch

pytest.importorskip("transformers")

import kdray  # noqa: E402
from jobs import digits_job  # noqa: E402
from kdray.models import create_model  # noqa: E402

TINY = dict(teacher="all_minilm_l6_v2", layers=2, hidden=32, heads=4, intermediate=64)


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    for head in ("classification", "masked_lm", "embedding"):
        create_model("hf_text", 2, head=head, **TINY).save_pretrained(root / head)
    return root


def text_job(tmp_path, teacher_dir, data, student_args, methods, mlflow_uri=None, **over):
    cfg = digits_job(tmp_path, mlflow_uri=mlflow_uri, **over)
    cfg["data"] = data
    cfg["teacher"] = {"model": "hf_text", "args": {"path": str(teacher_dir)}, "pretrained": True}
    cfg["student"] = {"model": "hf_text", "args": student_args}
    cfg["methods"] = methods
    cfg["train"] = {"epochs": 1, "lr": 0.005, "batch_size": 16, "optimizer": "adamw"}
    return cfg


@pytest.mark.slow  # ~45 s on a shared 2-core box: an MLflow store plus a job
def test_classification_job_logs_a_from_pretrained_directory(tmp_path, teacher_dirs):
    import mlflow
    import transformers

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    teacher = str(teacher_dirs / "classification")
    cfg = text_job(tmp_path, teacher_dirs / "classification",
                   {"name": "pang_lee_polarity", "options": {"tokenizer": teacher}},
                   {"teacher": teacher, "init_from_teacher": [1]}, [{"name": "kd", "temperature": 2.0}], uri)
    result = kdray.distill(cfg)
    (stage,) = result.stages
    assert stage["kind"] == "distill" and 0.0 <= stage["test_top1"] <= 1.0
    client = mlflow.tracking.MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name(cfg["mlflow"].get("experiment", "kdray")).experiment_id]
                             if cfg["mlflow"].get("experiment") else
                             [e.experiment_id for e in client.search_experiments()],
                             filter_string="tags.mlflow.runName = 'kd-seed0'")[0]
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="hf_model",
                                                tracking_uri=uri, dst_path=str(tmp_path / "dl"))
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(local).eval()
    tok = transformers.AutoTokenizer.from_pretrained(local)
    state = torch.load(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                           artifact_path="model/state_dict.pt", tracking_uri=uri,
                                                           dst_path=str(tmp_path / "dl2")), weights_only=True)
    student = create_model("hf_text", 2, teacher=teacher, init_from_teacher=[1])
    student.load_state_dict(state)
    student.eval()
    enc = dict(tok(["a fine film", "dull and long and a mess"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        assert torch.allclose(loaded(**enc).logits, student(enc), atol=1e-5)  # the trained student, back
    assert loaded.config.num_hidden_layers == 1


def test_masked_lm_and_embedding_jobs(tmp_path, teacher_dirs):
    lines = [f"the {w} sat on the mat near the old {v} house" for w in ("cat", "dog", "bird", "fox", "cow")
             for v in ("red", "blue", "green", "white")] * 2
    (tmp_path / "c.txt").write_text("\n".join(lines))
    tok = str(teacher_dirs / "masked_lm")
    mlm = text_job(tmp_path, teacher_dirs / "masked_lm",
                   {"name": "text_files", "options": {"path": str(tmp_path / "c.txt"), "tokenizer": tok,
                                                      "task": "masked_lm"}},
                   {"teacher": tok, "head": "masked_lm", "layers": 1, "hidden": 16, "heads": 2, "intermediate": 32},
                   [{"name": "kd", "temperature": 2.0}], name="mlm")
    (stage,) = kdray.distill(mlm).stages
    assert 0.0 <= stage["test_top1"] <= 1.0  # top-1 over the masked tokens only
    emb = text_job(tmp_path, teacher_dirs / "embedding",
                   {"name": "text_files", "options": {"path": str(tmp_path / "c.txt"), "tokenizer": tok,
                                                      "task": "embedding"}},
                   {"teacher": tok, "head": "embedding", "layers": 1, "hidden": 16, "heads": 2, "intermediate": 32},
                   [{"name": "embedding_cosine"}], name="emb", ce_weight=0.0)
    (stage,) = kdray.distill(emb).stages
    assert stage["kind"] == "distill"


def test_vocabulary_mismatch_is_refused_before_training(tmp_path, teacher_dirs):
    teacher = str(teacher_dirs / "classification")
    cfg = text_job(tmp_path, teacher_dirs / "classification",
                   {"name": "pang_lee_polarity", "options": {"tokenizer": teacher}},
                   {"teacher": teacher, "layers": 1, "hidden": 16, "heads": 2, "vocab": 500},
                   [{"name": "kd"}])
    with pytest.raises(kdray.ConfigError, match=r"student's vocabulary has 500 tokens .* give the student vocab=30522"):
        kdray.distill(cfg)
