"""Careless or hostile inputs that used to end in a traceback or a misleading message (issue 10, items 7 and 8):
each now ends `kdray run` with exit 2 and one `kdray: error:` line naming the file or key and the fix.

The CLI runs in this process (``cli.main``): an exception that escapes it would fail the test just as a
traceback would end the command. Only the cache cases start Ray (``kdray cache`` runs the teacher in Ray Data).
"""
from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from kdray.models import create_model
from kdray.orchestrator import cli
from kdray.orchestrator import cache_store as cs
from kdray.orchestrator import teacher_cache as tc

TINY = ["train.epochs=2", "teacher.train.epochs=2", "seeds=[0]", "ray.num_workers=0", "baseline=false",
        "mlflow.enabled=false"]


class Planted:
    """Unpickling this would create a marker file: what a booby-trapped checkpoint does."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A good teacher state_dict, the same cut in half, a pickle that plants a marker, image folders, bad YAML."""
    from PIL import Image

    root = tmp_path_factory.mktemp("inputs")
    torch.save(create_model("digits_cnn", 10).state_dict(), root / "teacher.pt")
    data = (root / "teacher.pt").read_bytes()
    (root / "half.pt").write_bytes(data[: len(data) // 2])
    Planted.marker = str(root / "PLANTED")
    torch.save({"fc.weight": Planted()}, root / "planted.pt")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            os.makedirs(root / "imgs" / split / cls)
            for i in range(2):
                pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / "imgs" / split / cls / f"{i}.png")
    (root / "imgs" / "train" / "a" / "notes.png").write_text("not an image")
    os.makedirs(root / "empty" / "train" / "a")
    (root / "bad.yaml").write_text("name: x\nstudent: {model: digits_mlp}\nteacher: {model: [1, 2}\n")
    os.makedirs(root / "configs")
    (root / "configs" / "job.yaml").write_text("name: x\n")
    return root


def error_line(capsys, *argv: str) -> str:
    """Run the CLI; it must exit 2 with exactly one `kdray: error:` line on stderr and no traceback."""
    rc = cli.main(list(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("kdray: error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err)
    return lines[0]


def _teacher(**source) -> str:
    return "teacher=" + json.dumps({"model": "digits_cnn", **source})


IMAGEFOLDER = ["data.name=imagefolder", "data.options={image_size: 8}", "teacher.args.in_channels=3",
               "student.args.in_channels=3"]
# (id, argv after `run` given the inputs folder, words the line must hold)
CASES = [
    ("truncated-checkpoint", lambda f: ["digits", *TINY, _teacher(checkpoint=str(f / "half.pt"))],
     ["teacher.checkpoint", "half.pt", "truncated", "torch.save(model.state_dict()"]),
    ("pickled-checkpoint", lambda f: ["digits", *TINY, _teacher(checkpoint=str(f / "planted.pt"))],
     ["teacher.checkpoint", "planted.pt", "refused", "never pickled code"]),
    ("empty-training-split", lambda f: ["digits", *TINY, "data.options={val_fraction: 0.6, test_fraction: 0.4}"],
     ["data:", "no training samples", "train_fraction"]),
    ("imagefolder-empty-train-dir", lambda f: ["digits", *TINY, *IMAGEFOLDER, f"data.root={f / 'empty'}"],
     [f"imagefolder {{}}{os.sep}train", "put images in"]),
    ("non-image-in-imagefolder", lambda f: ["digits", *TINY, *IMAGEFOLDER, f"data.root={f / 'imgs'}"],
     ["notes.png", "cannot be read as an image", "remove it"]),
    ("unparsable-override", lambda f: ["digits", *TINY, "seeds=[0,1"],
     ["'seeds=[0,1'", "not valid YAML", "close its brackets"]),
    ("override-without-key", lambda f: ["digits", *TINY, "=3"], ["'=3'", "has no key", "key.path=value"]),
    ("model-arg-rejected", lambda f: ["digits", *TINY, "student.args.hidden=-4"],
     ["student.args.hidden=-4", "digits_mlp", "valid value"]),
    ("yaml-syntax-error", lambda f: [str(f / "bad.yaml")], ["bad.yaml:3:23", "not valid YAML", "fix the syntax"]),
    ("directory-as-config", lambda f: [str(f / "configs")], ["is a directory", "job.yaml"]),
]


@pytest.mark.parametrize("argv,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_one_line_with_the_cause_and_the_fix(files, tmp_path, monkeypatch, capsys, argv, words):
    monkeypatch.chdir(tmp_path)
    line = error_line(capsys, "run", *argv(files))
    for word in words:
        assert word.replace("{}", str(files / "empty")) in line, line
    assert not (files / "PLANTED").exists()  # the planted pickle was refused, never run


def test_cifar_download_without_network(tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)  # never download 170 MB, with or without a network
    monkeypatch.chdir(tmp_path)
    line = error_line(capsys, "run", "digits", *TINY, "data.name=cifar10", f"data.root={tmp_path / 'cifar'}",
                      "data.download=true")
    assert "cifar-10-python.tar.gz" in line and "no network" in line and str(tmp_path / "cifar") in line, line


def test_unsupported_tracking_uri(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "foo://bar")
    monkeypatch.chdir(tmp_path)
    line = error_line(capsys, "run", "digits", *TINY[:-1])
    assert "MLFLOW_TRACKING_URI='foo://bar'" in line and "scheme 'foo'" in line and "sqlite:///" in line, line


def test_mlflow_artifact_refused_by_weights_only(files, tmp_path, monkeypatch, capsys):
    """A logged teacher whose state_dict.pt holds a pickled object is refused in a line naming the artifact."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("e", artifact_location=str(tmp_path / "artifacts")))
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(files / "planted.pt", model / "state_dict.pt")
    (model / "model_spec.json").write_text(json.dumps({"model": "digits_cnn", "args": {}, "num_classes": 10}))
    client.log_artifacts(run.info.run_id, str(model), "model")
    monkeypatch.chdir(tmp_path)
    line = error_line(capsys, "run", "digits", *TINY, f"mlflow.tracking_uri={uri}",
                      _teacher(mlflow_uri=f"runs:/{run.info.run_id}/model"))
    assert "teacher.mlflow_uri" in line and "state_dict.pt was refused" in line and "never pickled code" in line
    assert not (files / "PLANTED").exists()


# --- teacher-output caches: a checksum per file, verified on open ----------------------------------------------
@pytest.fixture(scope="module")
def cache(ray_session, files, tmp_path_factory):
    """A small real cache, written by `kdray cache`'s writer (Ray Data, one actor)."""
    out = tmp_path_factory.mktemp("cache") / "c"
    job = {"name": "c", "data": {"name": "digits", "options": {"train_fraction": 0.2}},
           "teacher": {"model": "digits_cnn", "checkpoint": str(files / "teacher.pt")},
           "student": {"model": "digits_mlp"}, "ray": {"num_workers": 0}, "mlflow": {"enabled": False}}
    tc.write_cache(job, str(out), actors=1, log=lambda *a: None)
    return out


def _logits(path) -> np.ndarray:
    import pyarrow.parquet as pq

    return np.array(pq.read_table(path, columns=["logits"]).column("logits").combine_chunks().flatten())


def _corrupt_data_page(src, dst) -> None:
    """Copy the cache and flip two bytes inside the logits column's data page (footer untouched), at the first
    place where Parquet still reads the file without complaint, only with other logits: what a bad disk does."""
    import pyarrow.parquet as pq

    shutil.copytree(src, dst)
    file = dst / tc.CACHE_FILE
    good = bytearray(file.read_bytes())
    meta = pq.ParquetFile(src / tc.CACHE_FILE).metadata
    column = next(meta.row_group(0).column(c) for c in range(meta.num_columns)
                  if meta.row_group(0).column(c).path_in_schema.startswith("logits"))
    chunk = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
    start, end = column.data_page_offset, chunk + column.total_compressed_size  # the data page ends the chunk
    assert end < len(good) - meta.serialized_size  # the footer lies after the data pages
    for offset in range((start + end) // 2, end - 2):
        bad = bytearray(good)
        bad[offset] ^= 0x7F
        bad[offset + 1] ^= 0x7F
        file.write_bytes(bad)
        try:
            if not np.array_equal(_logits(file), _logits(src / tc.CACHE_FILE)):
                return  # read without an error, with wrong logits
        except OSError:
            continue
    pytest.fail("no byte flip in the data page read without an error")


@pytest.mark.ray
def test_cache_with_corrupt_data_pages_is_refused(cache, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad"
    _corrupt_data_page(cache, bad)
    monkeypatch.chdir(tmp_path)
    line = error_line(capsys, "run", "digits", *TINY, _teacher(cache=str(bad)))
    assert str(bad / tc.CACHE_FILE) in line and "corrupt" in line and "kdray cache" in line, line


@pytest.mark.ray
def test_truncated_cache_names_its_file(cache, tmp_path, monkeypatch, capsys):
    cut = tmp_path / "cut"
    shutil.copytree(cache, cut)
    data = (cut / tc.CACHE_FILE).read_bytes()
    (cut / tc.CACHE_FILE).write_bytes(data[: len(data) // 2])
    monkeypatch.chdir(tmp_path)
    line = error_line(capsys, "run", "digits", *TINY, _teacher(cache=str(cut)))
    assert str(cut / tc.CACHE_FILE) in line and "truncated" in line and "kdray cache" in line, line


@pytest.mark.ray
def test_intact_cache_opens_and_records_its_checksum(cache):
    manifest = tc.read_manifest(str(cache))
    entry = manifest["files"][tc.CACHE_FILE]
    assert entry == {"bytes": os.path.getsize(cache / tc.CACHE_FILE), "sha256": cs.file_sha256(cache / tc.CACHE_FILE)}
    teacher = cs.load_cached_teacher(str(cache), manifest)
    assert teacher.num_rows == manifest["dataset"]["size"] and torch.isfinite(teacher.logits).all()
