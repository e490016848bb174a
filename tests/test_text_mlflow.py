"""A transformers text student is logged with the ``mlflow.transformers`` flavour and its tokenizer: loaded back
with ``mlflow.transformers.load_model`` (components or pipeline) it gives the trained student's outputs."""
import pytest
import torch

pytest.importorskip("transformers")

import kdray  # noqa: E402
from jobs import digits_job  # noqa: E402
from kdray.hf_local import load_tokenizer  # noqa: E402
from kdray.models import create_model  # noqa: E402
from kdray.models.text import mean_pool  # noqa: E402

TINY = dict(teacher="all_minilm_l6_v2", layers=1, hidden=32, heads=4, intermediate=64)
SENTENCES = ["a fine film , warm and funny", "dull and long and a mess", "the cast is great"]


def encoded(tokenizer):
    return dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))


def folder(path):
    path.mkdir()
    return str(path)


def logged_model_id(client, run) -> str:
    (output,) = client.get_run(run.info.run_id).outputs.model_outputs
    return output.model_id


@pytest.mark.slow  # ~45 s on the shared 2-core box: an MLflow store, a teacher directory and a one-epoch job
def test_text_jobs_student_loads_with_mlflow_transformers(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    torch.manual_seed(0)
    teacher = tmp_path / "teacher"
    create_model("hf_text", 2, head="classification", **TINY).save_pretrained(teacher)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = digits_job(tmp_path, mlflow_uri=uri)
    cfg["data"] = {"name": "pang_lee_polarity", "options": {"tokenizer": str(teacher)}}
    cfg["teacher"] = {"model": "hf_text", "args": {"path": str(teacher)}, "pretrained": True}
    student_args = {"teacher": str(teacher), "layers": 1, "hidden": 16, "heads": 2, "intermediate": 32}
    cfg["student"] = {"model": "hf_text", "args": student_args}
    cfg["methods"] = [{"name": "kd", "temperature": 2.0}]
    cfg["train"] = {"epochs": 1, "lr": 0.005, "batch_size": 16, "optimizer": "adamw"}
    (stage,) = kdray.distill(cfg).stages
    assert stage["kind"] == "distill"

    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                filter_string="tags.mlflow.runName = 'kd-seed0'")
    assert "kdray.model_log_error" not in run.data.tags
    model_uri = f"models:/{logged_model_id(client, run)}"
    mlflow.set_tracking_uri(uri)
    parts = mlflow.transformers.load_model(model_uri, return_type="components", dst_path=folder(tmp_path / "dl"))
    state = torch.load(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, tracking_uri=uri,
                                                           artifact_path="model/state_dict.pt",
                                                           dst_path=folder(tmp_path / "dl2")), weights_only=True)
    trained = create_model("hf_text", 2, **student_args)
    trained.load_state_dict(state)
    trained.eval()
    enc = encoded(parts["tokenizer"])
    assert enc["input_ids"].tolist() == encoded(load_tokenizer(teacher))["input_ids"].tolist()  # its tokenizer
    with torch.no_grad():
        reference = trained(enc)
        assert torch.allclose(parts["model"].eval()(**enc).logits, reference, atol=1e-5)
    assert parts["task"] == "text-classification" and parts["model"].config.num_hidden_layers == 1
    assert float(reference.softmax(-1).std()) > 0  # not a constant output: the comparison has something to match
    pipeline = mlflow.transformers.load_model(model_uri, dst_path=folder(tmp_path / "dl3"))
    scores = [max(p["score"] for p in row) for row in pipeline(SENTENCES, top_k=None)]
    assert torch.allclose(torch.tensor(scores), reference.softmax(-1).max(-1).values, atol=1e-5)


def test_embedding_student_logs_as_feature_extraction_and_mean_pools_back(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from kdray.orchestrator.text_model_logging import log_text_model

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("e"))
    torch.manual_seed(1)
    model = create_model("hf_text", 2, head="embedding", **TINY).eval()
    logged = client.create_logged_model(run.info.experiment_id, name="student", source_run_id=run.info.run_id)
    log_text_model(model, name="student", model_id=logged.model_id, run_id=run.info.run_id, uri=uri,
                   requirements=["torch", "transformers"])
    mlflow.set_tracking_uri(uri)
    parts = mlflow.transformers.load_model(f"models:/{logged.model_id}", return_type="components",
                                           dst_path=folder(tmp_path / "dl"))
    assert parts["task"] == "feature-extraction"
    enc = encoded(parts["tokenizer"])
    with torch.no_grad():
        pooled = mean_pool(parts["model"].eval()(**enc).last_hidden_state, enc["attention_mask"])
        assert torch.allclose(pooled, model(enc), atol=1e-5)

    knobs_only = create_model("hf_text", 2, layers=1, hidden=16, heads=2, intermediate=32, vocab=100)
    with pytest.raises(ValueError, match="has no tokenizer directory .* give the student teacher: <dir>$"):
        log_text_model(knobs_only, name="s", model_id=logged.model_id, run_id=run.info.run_id, uri=uri,
                       requirements=[])
