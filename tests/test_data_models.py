"""Data and models by name: deterministic splits, (x, y, index) items, real loaders on small local files."""
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from kdray.data import DatasetFilesMissingError, UnknownDatasetError, build_datasets, list_datasets
from kdray.models import UnknownModelError, create_model, list_models
from kdray.models.features import FeaturePathError, FeatureTap


def test_digits_split_is_deterministic_and_disjoint():
    a, b = build_datasets("digits"), build_datasets("digits")
    assert (len(a.train), len(a.val), len(a.test)) == (1079, 359, 359)
    x, y, i = a.train[5]
    assert x.shape == (1, 8, 8) and 0 <= x.min() and x.max() <= 1 and i == 5
    assert torch.equal(a.test[0][0], b.test[0][0])
    assert build_datasets("digits", train_fraction=0.2).fingerprint != a.fingerprint
    assert len(build_datasets("digits", train_fraction=0.2).train) == 216


def test_indices_run_over_the_split():
    s = build_datasets("fake", size=12, num_classes=3)
    assert [s.train[i][2] for i in range(12)] == list(range(12))
    assert s.train[0][0].shape == (3, 32, 32) and s.num_classes == 3


def _write_cifar10(root, n_train=20, n_test=10):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{k}", n_train // 5) for k in range(1, 6)] + [("test_batch", n_test)]:
        data = {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, n))}
        with open(folder / name, "wb") as fh:
            pickle.dump(data, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh)


def test_cifar10_loader_reads_local_files(tmp_path, monkeypatch):
    from torchvision.datasets import cifar

    _write_cifar10(tmp_path)
    # Our small files are in CIFAR's real format but cannot carry the published md5 sums.
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
    s = build_datasets("cifar10", root=str(tmp_path), val_fraction=0.25)
    assert (len(s.train), len(s.val), len(s.test)) == (15, 5, 10)
    x, y, i = s.train[0]
    assert x.shape == (3, 32, 32) and 0 <= y < 10 and s.num_classes == 10


def test_cifar_missing_files_error(tmp_path):
    with pytest.raises(DatasetFilesMissingError, match="set data.download: true"):
        build_datasets("cifar100", root=str(tmp_path))


def test_imagefolder_on_local_pngs(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for k in range(3):
                Image.fromarray(np.full((10, 10, 3), k * 40, np.uint8)).save(tmp_path / split / cls / f"{k}.png")
    s = build_datasets("imagefolder", root=str(tmp_path), image_size=16)
    assert s.num_classes == 2 and len(s.train) == 6 and s.train[0][0].shape == (3, 16, 16)
    with pytest.raises(DatasetFilesMissingError):
        build_datasets("imagefolder", root=str(tmp_path / "nope"))


def test_unknown_dataset_suggests():
    with pytest.raises(UnknownDatasetError, match="did you mean digits"):
        build_datasets("digit")
    assert {"digits", "cifar10", "cifar100", "imagefolder", "fake"} <= set(list_datasets())


def test_models_by_name_and_torchvision():
    assert {"digits_mlp", "digits_cnn", "resnet20", "wrn_40_2", "mobilenetv2", "shufflenetv2"} <= set(list_models())
    assert list_models("resnet8*") == ["resnet8", "resnet8x4"]
    tv = create_model("torchvision.resnet18", 7)
    assert tv(torch.zeros(1, 3, 64, 64)).shape == (1, 7)
    with pytest.raises(UnknownModelError, match="did you mean"):
        create_model("resnet21", 10)
    with pytest.raises(TypeError, match="no knob"):
        create_model("digits_mlp", 10, widht=3)


def test_feature_tap_by_module_path():
    model = create_model("digits_cnn", 10, width=4)
    tap = FeatureTap(model, ["stage1", "stage2", "pool"])
    with tap.capture() as feats:
        model(torch.zeros(3, 1, 8, 8))
    assert feats["stage1"].shape == (3, 4, 4, 4) and feats["stage2"].shape == (3, 8, 2, 2)
    assert feats["pool"].shape == (3, 8, 1, 1)
    with pytest.raises(FeaturePathError, match="nearest valid paths: stage2"):
        FeatureTap(model, ["stage3"])


def test_cli_lists(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "kdray.orchestrator.cli", "list", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=120, check=True).stdout
    models = run("models", "wrn_*").split("\n")
    assert [m.split("\t")[0] for m in models if m] == ["wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"]
    assert "digits\t" in run("datasets")
    assert run("methods").splitlines()[0].count("\t") == 2
    from kdray.config import SCHEMES

    schemes = [line.split("\t") for line in run("schemes").splitlines()]
    assert [name for name, _ in schemes] == list(SCHEMES) and all(desc for _, desc in schemes)


def test_an_empty_split_evaluates_to_nan_not_zero():
    import math

    from kdray.algorithms.engine import evaluate
    from kdray.data import build_datasets
    from kdray.models import create_model

    splits = build_datasets("digits", val_fraction=0.0)
    assert len(splits.val) == 0
    model = create_model("digits_mlp", 10)
    empty = evaluate(model, torch.utils.data.DataLoader(splits.val, batch_size=8), "cpu", 10)
    assert math.isnan(empty["top1"]) and math.isnan(empty["loss"])
    some = evaluate(model, torch.utils.data.DataLoader(splits.test, batch_size=64), "cpu", 10)
    assert 0.0 <= some["top1"] <= 1.0
