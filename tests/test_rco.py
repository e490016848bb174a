"""RCO (Jin et al. 2019): the plan, the refusals, each student stage's anchor, the student carried across, resume."""
import pytest
import torch

import kdray
from kdray.algorithms.engine import TrainLoop
from kdray.config import ConfigError, load_config
from kdray.orchestrator.plan import plan_stages
from jobs import digits_job

pytestmark = pytest.mark.usefixtures("one_thread")


def _rco_job(tmp_path, **over):
    over = {"scheme": "rco", "rco": {"anchors": [1, 2], "epochs_per_anchor": 2}, "teacher__train__epochs": 4,
            "train__epochs": 2, **over}
    return digits_job(tmp_path, **over)


def test_plan_has_one_student_stage_per_anchor_then_the_final_teacher(tmp_path):
    stages = plan_stages(load_config(_rco_job(tmp_path, seeds=[0, 1], baseline=True)))
    assert [(s.name, s.kind, [str(t) for t in s.teachers]) for s in stages] == [
        ("teacher", "teacher", []),
        ("scratch-seed0", "scratch", []),
        ("rco-seed0-anchor0", "rco_anchor", ["stage:teacher@epoch1"]),
        ("rco-seed0-anchor1", "rco_anchor", ["stage:teacher@epoch2"]),
        ("rco-seed0", "rco", ["stage:teacher"]),
        ("scratch-seed1", "scratch", []),
        ("rco-seed1-anchor0", "rco_anchor", ["stage:teacher@epoch1"]),
        ("rco-seed1-anchor1", "rco_anchor", ["stage:teacher@epoch2"]),
        ("rco-seed1", "rco", ["stage:teacher"])]
    assert all(s.keep for s in stages if s.kind in ("teacher", "rco_anchor"))


@pytest.mark.parametrize("over, message", [
    ({"rco": {"anchors": [2, 4]}}, "^config: rco.anchors: epoch 4 is not before the teacher's last epoch "
                                   r"\(teacher.train.epochs: 4\)"),
    ({"rco": {"anchors": []}}, "needs rco.anchors"),
    ({"rco": {"anchors": [3, 2]}}, "^rco.anchors: anchors must be increasing teacher epochs >= 1"),
    ({"ray": {"num_workers": 1, "stage_tasks": True}}, "set ray.stage_tasks: false"),
])
def test_bad_rco_configs_fail_in_one_line(tmp_path, over, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(_rco_job(tmp_path, **over))
    assert "\n" not in str(err.value)


def test_a_teacher_without_training_or_from_a_cache_is_refused(tmp_path):
    ckpt = tmp_path / "t.pt"
    torch.save({}, ckpt)
    job = _rco_job(tmp_path)
    job["teacher"] = {"model": "digits_cnn", "checkpoint": str(ckpt)}
    with pytest.raises(ConfigError, match="a teacher given as checkpoint / mlflow_uri has none of: give teacher.train"):
        load_config(job)
    job["teacher"] = {"model": "digits_cnn", "cache": str(tmp_path)}
    with pytest.raises(ConfigError, match="a teacher cache holds only the final teacher's outputs"):
        load_config(job)


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_each_stage_reads_its_anchor_and_starts_from_the_previous_student(tmp_path, monkeypatch):
    starts = {}
    real_run = TrainLoop.run

    def recording_run(self):
        name = next(cb.stage for cb in self.callbacks if hasattr(cb, "stage") and isinstance(cb.stage, str))
        teacher = None if self.teacher is None else _state(self.teacher.model)
        starts[name] = (_state(self.eval_model), teacher)
        return real_run(self)

    monkeypatch.setattr(TrainLoop, "run", recording_run)
    result = kdray.distill(_rco_job(tmp_path, checkpoint__every_epochs=1), quiet=True)
    assert [s["name"] for s in result.stages] == ["teacher", "rco-seed0-anchor0", "rco-seed0-anchor1", "rco-seed0"]
    weights = torch.load(tmp_path / "runs" / "t" / "checkpoint" / "state.pt", weights_only=True)["weights"]
    assert {"teacher@epoch1", "teacher@epoch2", "teacher", "rco-seed0-anchor0", "rco-seed0-anchor1"} <= set(weights)
    for stage, anchor in (("rco-seed0-anchor0", "teacher@epoch1"), ("rco-seed0-anchor1", "teacher@epoch2"),
                          ("rco-seed0", "teacher")):
        taught_by = starts[stage][1]
        assert all(torch.equal(taught_by[k], weights[anchor][k]) for k in taught_by), stage
    w = "fc.weight"
    assert not torch.equal(weights["teacher@epoch1"][w], weights["teacher@epoch2"][w])
    assert not torch.equal(weights["teacher@epoch2"][w], weights["teacher"][w])
    # the route continues: each later stage starts from the student the previous stage left
    for stage, previous in (("rco-seed0-anchor1", "rco-seed0-anchor0"), ("rco-seed0", "rco-seed0-anchor1")):
        student = starts[stage][0]
        assert all(torch.equal(student[k], weights[previous][k]) for k in student), stage
    assert not torch.equal(starts["rco-seed0-anchor0"][0]["fc.weight"], weights["rco-seed0-anchor0"]["fc.weight"])


def test_a_job_interrupted_in_the_teacher_resumes_with_its_anchors(tmp_path, monkeypatch):
    reference = kdray.distill(_rco_job(tmp_path, name="ref"), quiet=True)
    real_epoch = TrainLoop.train_epoch
    calls = {"n": 0}

    def crash_in_teacher_epoch_3(self, epoch):
        calls["n"] += 1
        if calls["n"] == 3:  # anchors 1 and 2 are kept and checkpointed by now
            raise KeyboardInterrupt("simulated crash")
        return real_epoch(self, epoch)

    monkeypatch.setattr(TrainLoop, "train_epoch", crash_in_teacher_epoch_3)
    cfg = _rco_job(tmp_path, checkpoint__every_epochs=1)
    with pytest.raises(KeyboardInterrupt):
        kdray.distill(cfg, quiet=True)
    monkeypatch.setattr(TrainLoop, "train_epoch", real_epoch)
    state = torch.load(tmp_path / "runs" / "t" / "checkpoint" / "state.pt", weights_only=True)
    assert not state["done"] and {"teacher@epoch1", "teacher@epoch2"} <= set(state["weights"])
    resumed = kdray.distill(cfg, resume=True, quiet=True)
    for a, b in zip(resumed.stages, reference.stages, strict=True):
        assert a["name"] == b["name"] and a["test_top1"] == pytest.approx(b["test_top1"], abs=1e-9)
