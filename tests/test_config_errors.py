"""Malformed configs: each gives one line naming the key, the bad value and what is allowed."""
import subprocess
import sys

import pytest
import torch

import kdray
from kdray.config import ConfigError, load_config
from jobs import digits_job


def _bad(tmp_path, **over):
    return digits_job(tmp_path, **over)


CASES = [
    ("unknown model", dict(student={"model": "resnet9000"}), r"student\.model: unknown model 'resnet9000'"),
    ("negative temperature", dict(methods=[{"name": "kd", "temperature": -1}]), r"methods\.0: kd\.temperature must be > 0"),
    ("alpha outside [0,1]", dict(methods=[{"name": "kd", "alpha": 1.5}]), r"kd\.alpha must be in \[0, 1\]"),
    ("unknown key", dict(trian={"epochs": 3}), r"trian: Extra inputs are not permitted"),
    ("wrong type", dict(train__epochs="many"), r"train\.epochs: Input should be a valid integer.*'many'"),
    ("negative lr", dict(train__lr=-0.1), r"train\.lr: Input should be greater than 0"),
    ("unknown method", dict(methods=[{"name": "kdd"}]), r"unknown method 'kdd'; did you mean kd"),
    ("unknown method parameter", dict(methods=[{"name": "kd", "temp": 4}]), r"kd' has no parameter\(s\) \['temp'\]"),
    ("unknown dataset", dict(data={"name": "mnist"}), r"data\.name: unknown dataset 'mnist'; allowed:"),
    ("unknown optimizer", dict(train__optimizer="lbfgs"), r"train\.optimizer: Input should be 'sgd', 'adamw' or 'dot'"),
    ("two teacher sources", dict(teacher={"model": "digits_cnn", "train": {}, "mlflow_uri": "runs:/x/model"}),
     r"teacher: give exactly one of train, checkpoint, mlflow_uri"),
    ("missing teacher checkpoint", dict(teacher={"model": "digits_cnn", "checkpoint": "/nope/t.pt"}),
     r"teacher: checkpoint file /nope/t\.pt does not exist"),
    ("unknown model knob", dict(student={"model": "digits_mlp", "args": {"widht": 3}}), r"has no knob\(s\) \['widht'\]"),
    ("num_classes in args", dict(student={"model": "digits_mlp", "args": {"num_classes": 3}}), r"num_classes comes from the dataset"),
    ("duplicate seeds", dict(seeds=[1, 1]), r"seeds: seeds must be distinct"),
    ("bad job name", dict(name="a/b"), r"name: must be one directory name .*\(got 'a/b'\)"),
]


@pytest.mark.parametrize("label,over,pattern", CASES, ids=[c[0] for c in CASES])
def test_malformed_config_one_line_error(tmp_path, label, over, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config(_bad(tmp_path, **over))
    assert "\n" not in str(info.value)


def test_missing_dataset_files(tmp_path):
    cfg = _bad(tmp_path, data={"name": "cifar10", "root": str(tmp_path / "nothing")})
    with pytest.raises(ConfigError, match=r"cifar10 files not found under .*set data\.download: true"):
        kdray.distill(cfg)


def test_teacher_student_class_count_mismatch(tmp_path):
    from kdray.models import create_model

    path = tmp_path / "teacher100.pt"
    torch.save(create_model("digits_cnn", 100).state_dict(), path)
    cfg = _bad(tmp_path, teacher={"model": "digits_cnn", "checkpoint": str(path)})
    with pytest.raises(ConfigError, match=r"'fc\.weight' has shape \(100, 32\).*\(10, 32\).*dataset has 10 classes"):
        kdray.distill(cfg)


def test_missing_feature_point_lists_nearest(tmp_path):
    cfg = _bad(tmp_path, student={"model": "digits_cnn"},
               methods=[{"name": "kd", "student_points": ["stage_1"]}])
    with pytest.raises(ConfigError, match=r"student has no module 'stage_1'; nearest valid paths: stage1"):
        kdray.distill(cfg)


def test_cli_prints_one_line_and_exit_code_2(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("teacher: {model: digits_cnn, train: {}}\nstudent: {model: digits_mlp}\ntrain: {epochs: -3}\n")
    proc = subprocess.run([sys.executable, "-m", "kdray.orchestrator.cli", "run", str(cfg)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "kdray: error: train.epochs: Input should be greater than 0 (got -3)"


def test_cli_override_and_yaml_errors(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("teacher: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(broken))
    with pytest.raises(ConfigError, match="neither a file nor a packaged example"):
        load_config("no-such-config")
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        load_config("digits", ["seeds"])
    assert load_config("digits", ["ray.num_workers=2", "seeds=[4,5]"]).seeds == [4, 5]
    with pytest.raises(ConfigError, match=r"digits_sweep is a sweep file .* `kdray sweep digits_sweep`"):
        load_config("digits_sweep")


def test_method_needing_features_from_model_that_declares_none(tmp_path):
    cfg = _bad(tmp_path, student={"model": "torchvision.squeezenet1_0"}, methods=[{"name": "at"}],
               data={"name": "fake", "options": {"size": 8, "image_size": 32}},
               teacher={"model": "resnet8", "train": {"epochs": 1}})
    with pytest.raises(ConfigError, match=r"student \(SqueezeNet\) declares no default stages feature points; "
                                          r"give the module paths explicitly"):
        kdray.distill(cfg)
