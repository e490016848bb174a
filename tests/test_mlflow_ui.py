"""The MLflow UI in a real browser: ``kdray ui`` on a tiny digits job's store, pages rendered by headless
Chromium after their JavaScript ran (``bench/ui.py`` holds the check; ``.ci/run`` installs Chromium)."""
import os
import shutil

import pytest
from mlflow.tracking import MlflowClient

import kdray
from jobs import digits_job, load_bench

ui = load_bench("ui")


@pytest.mark.slow
@pytest.mark.skipif(ui.chromium() is None, reason="chromium is not installed: apt-get install -y chromium "
                                                  "(.ci/run does)")
def test_mlflow_ui_shows_training_runs_models_datasets_and_description(tmp_path, mlflow_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    result = kdray.distill(digits_job(tmp_path, mlflow_uri, name="ui", train__epochs=2, teacher__train__epochs=2))
    check = ui.check(mlflow_uri, str(tmp_path / "ui"))
    pages = check["pages"]
    assert {name: page["missing"] for name, page in pages.items()} == {name: [] for name in pages}

    experiment = pages["experiment"]["text"]  # the runs table of the "Model training" view, stage runs as rows
    assert "Model training" in experiment and "Runs" in experiment
    assert all(name in experiment for name in ("ui", "teacher", "kd-seed0"))
    assert "digits (" in experiment  # Dataset column: name (digest)
    job = pages["job_run"]["text"]  # the description: the results table, cell by cell
    for row in result.table().splitlines()[2:]:
        assert all(cell.strip() in job for cell in row.strip("|").split("|"))
    assert "ui-distill" in pages["stage_run"]["text"] and "system/cpu_utilization_percentage" in pages["stage_run"]["text"]
    models = pages["models"]["text"]  # the experiment's logged models and the registry versions made from them
    assert all(name in models for name in ("teacher", "kd-seed0", "ui-teacher", "ui-distill", "Ready"))

    # kdray ui printed the link that opens the training-runs view
    exp_id = MlflowClient(mlflow_uri).get_run(result.parent_run_id).info.experiment_id
    assert f"/#/experiments/{exp_id}/runs?workflowType=machine_learning" in check["ui_output"]
    # the screenshot is an artifact of the job run
    files = {a.path for a in MlflowClient(mlflow_uri).list_artifacts(result.parent_run_id, "ui")}
    assert files == {"ui/experiment.png"}
    assert os.path.getsize(pages["experiment"]["png"]) > 20_000  # a rendered page, not a blank one
    if os.environ.get("KDRAY_UI_SCREENSHOTS"):  # keep the screenshots for a look
        shutil.copytree(tmp_path / "ui", os.environ["KDRAY_UI_SCREENSHOTS"], dirs_exist_ok=True)
