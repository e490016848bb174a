"""``ray.stage_tasks``: a job's stages as dependent Ray tasks (kdray/orchestrator/stage_graph.py).

Born-again generations and a TAKD chain run one task per stage, each waiting for the task whose weights teach
it; two seeds' chains overlap in time; accuracies equal the in-process run of the same seeds; a stage whose
worker is killed is retried by Ray from its own checkpoint; ``resume=True`` skips finished stages; online
stages run as tasks too.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

import kdray
from jobs import digits_job
from kdray.config import ConfigError, load_config
from kdray.orchestrator.run_dir import RunDir
from kdray.orchestrator.stage_graph import TASK_TAG

pytestmark = pytest.mark.ray

# Each task is one process on one thread, like the in-process run: measured identical here (difference 0.0).
SAME_ACCURACY = 1e-9


def _self_job(tmp_path, name, tasks: bool, **over) -> dict:
    over = {"self_distill": {"generations": 3}, "train": {"epochs": 8, "lr": 0.1, "batch_size": 32}, **over}
    cfg = digits_job(tmp_path, None, name=name, scheme="self", **over)
    cfg.pop("teacher")
    if tasks:
        cfg["ray"] = {"num_workers": 1, "stage_tasks": True}
    return cfg


def _by_name(result) -> dict[str, dict]:
    return {s["name"]: s for s in result.stages}


def _chain_order_holds(rows: list[dict]) -> None:
    """Each stage started after the one teaching it had finished (and persisted its result)."""
    for before, after in zip(rows, rows[1:]):
        assert before["finished_at"] <= after["started_at"], (before["name"], after["name"])


@pytest.fixture(scope="module")
def born_again(tmp_path_factory, ray_session):
    tmp = tmp_path_factory.mktemp("born_again")
    on_tasks = kdray.distill(_self_job(tmp, "ba-tasks", True, seeds=[0, 1]))
    in_process = kdray.distill(_self_job(tmp, "ba-local", False, seeds=[0, 1]))
    return on_tasks, in_process


def test_born_again_generations_are_dependent_tasks(born_again):
    on_tasks, _ = born_again
    rows = _by_name(on_tasks)
    assert len({r["ray_task_id"] for r in rows.values()}) == 6  # 2 seeds x 3 generations, one task each
    for seed in (0, 1):
        chain = [rows[f"gen{g}-seed{seed}"] for g in range(3)]
        assert [r["teachers"] for r in chain[1:]] == [[f"stage:gen0-seed{seed}"], [f"stage:gen1-seed{seed}"]]
        _chain_order_holds(chain)
        assert 0.0 < chain[-1]["ensemble_test_top1"] <= 1.0  # the ensemble of generations, evaluated on Ray


def test_born_again_tasks_equal_in_process_run(born_again):
    on_tasks, in_process = born_again
    local = _by_name(in_process)
    for name, row in _by_name(on_tasks).items():
        assert abs(row["test_top1"] - local[name]["test_top1"]) <= SAME_ACCURACY, name
        assert abs(row["val_top1"] - local[name]["val_top1"]) <= SAME_ACCURACY, name
        if "ensemble_test_top1" in local[name]:
            assert abs(row["ensemble_test_top1"] - local[name]["ensemble_test_top1"]) <= SAME_ACCURACY
    assert on_tasks.accuracies("generation")[-1] > 0.5


def test_two_seeds_chains_run_concurrently(born_again):
    rows = _by_name(born_again[0])
    a, b = rows["gen0-seed0"], rows["gen0-seed1"]  # nothing orders them: both start as soon as Ray can
    assert a["started_at"] < b["finished_at"] and b["started_at"] < a["finished_at"], (a, b)
    assert a["worker_pid"] != b["worker_pid"]


def test_takd_chain_as_tasks_records_each_stage_in_mlflow(tmp_path, ray_session, mlflow_uri):
    cfg = digits_job(tmp_path, mlflow_uri, name="takd", scheme="assistant", ray={"num_workers": 1, "stage_tasks": True},
                     assistants=[{"model": "digits_cnn", "args": {"width": 8}},
                                 {"model": "digits_cnn", "args": {"width": 4}}])
    result = kdray.distill(cfg)
    names = ["teacher", "assistant-0", "assistant-1", "kd-seed0"]
    assert [s["name"] for s in result.stages] == names
    _chain_order_holds(result.stages)
    assert result.accuracies("distill")[0] > 0.5
    client = MlflowClient(mlflow_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    children = {r.info.run_name: r for r in client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")}
    assert set(children) == set(names)
    for row in result.stages:
        run = children[row["name"]]
        assert run.info.status == "FINISHED"
        assert run.data.tags[TASK_TAG] == row["ray_task_id"]  # logged from inside that stage's own task
        assert abs(run.data.metrics["test_top1"] - row["test_top1"]) < 1e-12
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_top1")) == list(range(8))


# --- failures: a killed stage task is retried from its checkpoint; --resume skips finished stages -------------


def _kill_writer_of_first_mid_checkpoint(path: str, done: threading.Event, killed: dict) -> None:
    """SIGKILL the process that wrote the stage's first mid-stage checkpoint, as soon as one exists."""
    deadline = time.monotonic() + 120
    while not done.is_set() and time.monotonic() < deadline:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, EOFError, RuntimeError):
            state = None
        if state is not None:
            if state["loop"] is not None:
                os.kill(state["writer"]["pid"], signal.SIGKILL)
                killed.update(pid=state["writer"]["pid"], epoch=int(state["loop"]["epoch"]))
            return
        time.sleep(0.005)


@pytest.fixture(scope="module")
def killed_then_resumed(tmp_path_factory, ray_session):
    tmp = tmp_path_factory.mktemp("kill")
    over = dict(self_distill={"generations": 2}, data={"name": "digits", "options": {"train_fraction": 1.0}},
                train={"epochs": 24, "lr": 0.1, "batch_size": 32}, checkpoint={"every_epochs": 4})
    reference = kdray.distill(_self_job(tmp, "reference", False, **over))
    cfg = _self_job(tmp, "kill", True, **over)
    cfg["ray"]["max_failures"] = 1
    path = RunDir(load_config(cfg).run_dir(), "").stage_file("gen1-seed0")
    killed, done = {}, threading.Event()
    killer = threading.Thread(target=_kill_writer_of_first_mid_checkpoint, args=(path, done, killed), daemon=True)
    killer.start()
    try:
        retried = kdray.distill(cfg)
    finally:
        done.set()
        killer.join(10)
    os.remove(path)  # gen1's result file lost: --resume must re-run gen1 only
    resumed = kdray.distill(cfg, resume=True)
    return reference, killed, retried, resumed


def test_killed_stage_task_is_retried_from_its_checkpoint(killed_then_resumed):
    reference, killed, retried, _ = killed_then_resumed
    assert killed.get("epoch") in range(4, 24, 4), killed  # the first mid-stage checkpoint (every 4 epochs)
    with pytest.raises(ProcessLookupError):
        os.kill(killed["pid"], 0)
    gen1 = _by_name(retried)["gen1-seed0"]
    assert gen1["worker_pid"] != killed["pid"] and gen1["resumed_from_epoch"] >= killed["epoch"]
    for name, row in _by_name(reference).items():  # resuming mid-stage changes nothing
        assert abs(_by_name(retried)[name]["test_top1"] - row["test_top1"]) <= SAME_ACCURACY, name


def test_resume_skips_finished_stages(killed_then_resumed, tmp_path):
    _, _, retried, resumed = killed_then_resumed
    before, after = _by_name(retried), _by_name(resumed)
    assert after["gen0-seed0"] == before["gen0-seed0"]  # not re-run: the persisted row, task id and times
    assert after["gen1-seed0"]["ray_task_id"] != before["gen1-seed0"]["ray_task_id"]
    assert after["gen1-seed0"]["started_at"] > before["gen1-seed0"]["finished_at"]
    assert after["gen1-seed0"]["resumed_from_epoch"] == 0
    assert abs(after["gen1-seed0"]["test_top1"] - before["gen1-seed0"]["test_top1"]) <= SAME_ACCURACY
    assert after["gen1-seed0"]["ensemble_test_top1"] == before["gen1-seed0"]["ensemble_test_top1"]


def test_stage_tasks_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"ray.stage_tasks runs each stage as one single-process Ray task; set "
                                          r"ray.num_workers: 1 \(got 2\)"):
        load_config(digits_job(tmp_path, ray={"num_workers": 2, "stage_tasks": True}))
    cfg = digits_job(tmp_path, ray={"num_workers": 1, "stage_tasks": True})
    os.makedirs(os.path.join(load_config(cfg).run_dir(), "stages"))
    with pytest.raises(ConfigError, match="already has results .* pass --resume"):
        kdray.distill(cfg)


def test_online_stages_run_as_tasks_like_in_process(tmp_path, ray_session):
    """Online stages have no stage teachers: the cohort and its independent baseline are two parallel tasks."""
    cnn = {"model": "digits_cnn", "args": {"width": 4}}
    rows = []
    for ray_cfg in ({"num_workers": 0}, {"num_workers": 1, "stage_tasks": True}):
        cfg = digits_job(tmp_path, None, name=f"online{len(ray_cfg)}", scheme="online", methods=[], baseline=True,
                         online={"peers": [cnn, cnn]}, train__epochs=2, ray=ray_cfg)
        cfg.pop("teacher")
        rows.append(_by_name(kdray.distill(cfg)))
    local, on_tasks = rows
    assert set(on_tasks) == {"independent-seed0", "dml-seed0"}
    for name, row in on_tasks.items():
        assert row["peer_test_top1"] == pytest.approx(local[name]["peer_test_top1"], abs=SAME_ACCURACY), name
