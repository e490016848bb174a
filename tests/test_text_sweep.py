"""``kdray sweep`` over a text job: KD's temperature and TinyBERT's layer map are the search space.

The layer map is a labelled choice (``{choice: {label: {_value: {student layer: teacher layer}}}}``): a mapping
cannot be an Optuna categorical, so Optuna picks the label and the space writes its mapping into the trial's config.
Teacher (3 layers, trained once) and data: :mod:`text_corpus`. Checked: every trial ran with the temperature and
layer map it was sampled (its saved job config), the trials are runs under the sweep's MLflow parent, and the best
configuration carries the best trial's searched values.
"""
from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("transformers")

import kdray  # noqa: E402
from kdray.config import ConfigError  # noqa: E402
from text_corpus import digit_corpus, save_text_model, text_job  # noqa: E402

LAYER_MAPS = {"uniform": {1: 1, 2: 3}, "top": {1: 2, 2: 3}}  # student layer -> teacher layer (of 3)
SPACE = {
    "methods.0.temperature": {"float": [1.0, 4.0]},
    "methods.1.layer_map": {"choice": {label: {"_value": lm} for label, lm in LAYER_MAPS.items()}},
}


def _layer_map(mapping) -> dict[int, int]:
    """A layer map with int keys (a JSON round trip makes them strings)."""
    return {int(k): int(v) for k, v in mapping.items()}


@pytest.mark.ray
@pytest.mark.slow  # a base job and 4 Tune trials
def test_sweep_over_temperature_and_tinybert_layer_map(tmp_path, ray_session, mlflow_uri):
    from mlflow.tracking import MlflowClient

    corpus = digit_corpus(tmp_path, teacher_layers=(3,))
    methods = [{"name": "kd", "alpha": 0.9, "temperature": 2.0},
               {"name": "tinybert", "prediction_weight": 0.0, "layer_map": LAYER_MAPS["uniform"]}]
    base = text_job(tmp_path, corpus, "base", 0, mlflow_uri, corpus["teachers"], methods,
                    {"epochs": 2, "lr": 0.005, "batch_size": 16, "optimizer": "adamw"})
    result = kdray.sweep(SPACE, base, num_samples=4, sampler="random", asha=False, max_concurrent=2,
                         name="text-sweep", output_dir=str(tmp_path / "out"), register_model=False, verbose=0,
                         log=lambda m: None)
    trials = result.trials
    assert len(trials) == 4 and (trials["status"] == "complete").all(), trials[["name", "status"]]
    for _, row in trials.iterrows():
        job = json.loads(open(os.path.join(row["run_dir"], "config.json")).read())
        assert job["methods"][0]["temperature"] == pytest.approx(row["methods.0.temperature"])
        assert _layer_map(job["methods"][1]["layer_map"]) == _layer_map(row["methods.1.layer_map"])
        assert _layer_map(row["methods.1.layer_map"]) in LAYER_MAPS.values()
        assert 0.0 <= row["val_top1"] <= 1.0
    assert trials["methods.0.temperature"].nunique() == 4  # sampled, not the base's 2.0
    client = MlflowClient(mlflow_uri)
    children = client.search_runs([client.get_run(result.parent_run_id).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert sorted(r.info.run_name for r in children) == sorted(["base", *trials["name"]])
    by_name = {r.info.run_name: r for r in children}
    for _, row in trials.iterrows():
        run = by_name[row["name"]]
        assert run.info.status == "FINISHED"
    best = result.best_config
    assert best["methods"][0]["temperature"] == pytest.approx(result.best["methods.0.temperature"])
    assert _layer_map(best["methods"][1]["layer_map"]) == _layer_map(result.best["methods.1.layer_map"])
    assert result.best["val_top1"] == trials["val_top1"].max()


def test_latency_objective_on_text_inputs_is_one_line_before_any_trial(tmp_path):
    """latency_ms times the student on one input tensor: a text job's mapping inputs are refused up front."""
    corpus = digit_corpus(tmp_path, teacher_layers=())
    save_text_model(tmp_path / "teacher", 10, layers=2)
    corpus["teachers"] = [str(tmp_path / "teacher")]
    base = text_job(tmp_path, corpus, "base", 0, None, corpus["teachers"], [{"name": "kd"}],
                    {"epochs": 1, "lr": 0.005, "batch_size": 16, "optimizer": "adamw"})
    with pytest.raises(ConfigError, match=r"latency_ms times the student on one input tensor, but this job's "
                                          r"inputs are a mapping \(text\); drop latency_ms"):
        kdray.sweep({"methods.0.temperature": {"float": [1.0, 4.0]}}, base, num_samples=2,
                    objectives=["val_top1:max", "latency_ms:min"], asha=False, name="lat",
                    output_dir=str(tmp_path / "out"), log=lambda m: None)
