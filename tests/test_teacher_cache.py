"""Teacher-output cache: `kdray cache` (Ray Data actor pool -> Parquet), students trained from it with no teacher.

Two Ray Data passes per session (a float32 cache via the CLI, a float16 one via the API); the top-k encoding is
checked without Ray. Float16 tolerance: a logit is stored with relative error <= 2**-11 (~4.9e-4), so a KD loss
computed from float16 logits is compared at rel 2e-3.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from torch.utils.data import DataLoader

import kdray
from kdray.algorithms import create_method
from kdray.algorithms.base import Batch, ModelOutput
from kdray.algorithms.cached_teacher import CachedTeacher, logits_from_topk
from kdray.algorithms.distiller import Teacher
from kdray.data import build_datasets
from kdray.models import create_model
from kdray.orchestrator import cli
from kdray.orchestrator import teacher_cache as tc
from kdray.orchestrator.job import load_weights
from jobs import digits_job

DIGITS = {"train_fraction": 0.2}
FP16_REL = 2e-3


def _train_teacher(splits, epochs: int = 12) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("digits_cnn", 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(splits.train, batch_size=32, shuffle=True)
    for _ in range(epochs):
        for x, y, _i in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These digits models are tiny: one thread is fastest, and on a shared 2-core machine two threads that
    spin-wait for each other cost up to 20x (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def splits():
    return build_datasets("digits", **DIGITS)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, splits):
    """A trained digits_cnn teacher saved as a state_dict (two copies: t16.pt is the float16 cache's source)."""
    root = tmp_path_factory.mktemp("teacher")
    state = _train_teacher(splits).state_dict()
    torch.save(state, root / "t.pt")
    torch.save(state, root / "t16.pt")
    return root


def _cache_job(tmp_path, cache=None, checkpoint=None, **over) -> dict:
    teacher = {"model": "digits_cnn"}
    teacher.update({k: v for k, v in (("cache", cache), ("checkpoint", checkpoint)) if v is not None})
    return digits_job(tmp_path, teacher=teacher, **over)


@pytest.fixture(scope="module")
def caches(ray_session, ckpt, tmp_path_factory):
    """`kdray cache` from the CLI (float32, full logits) and write_cache (float16) on the same teacher."""
    root = tmp_path_factory.mktemp("caches")
    config = root / "job.yaml"
    config.write_text(yaml.safe_dump(_cache_job(root, checkpoint=str(ckpt / "t.pt"))))
    assert cli.main(["cache", str(config), "--output", str(root / "c32"), "--actors", "1"]) == 0
    tc.write_cache(_cache_job(root, checkpoint=str(ckpt / "t16.pt")), str(root / "c16"), float16=True, actors=1)
    return root


def _live_teacher(ckpt) -> Teacher:
    model = load_weights(create_model("digits_cnn", 10), torch.load(ckpt / "t.pt", weights_only=True), "t", 10)
    return Teacher(model)


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text and text, text
    return text


def test_cache_files_hold_identity(caches, ckpt, splits):
    manifest = json.loads((caches / "c32" / tc.MANIFEST).read_text())
    assert manifest == tc.read_manifest(str(caches / "c32"))  # schema metadata == manifest.json
    assert manifest["dataset"]["fingerprint"] == splits.fingerprint and manifest["dataset"]["size"] == len(splits.train)
    assert manifest["teacher"]["state_sha256"] == tc.state_dict_hash(torch.load(ckpt / "t.pt", weights_only=True))
    assert manifest["views"] == {"kind": "fixed", "count": 1} and manifest["features"] == []
    import pyarrow.parquet as pq

    table = pq.read_table(caches / "c32" / tc.CACHE_FILE)
    assert table.column_names == ["index", "view", "aug_params", "logits"]
    assert table.column("index").to_pylist() == list(range(len(splits.train)))


def test_cached_kd_loss_equals_live_kd_loss(caches, ckpt, splits):
    live = _live_teacher(ckpt)
    exact = tc.load_cached_teacher(str(caches / "c32"))
    half = tc.load_cached_teacher(str(caches / "c16"))
    kd = create_method("kd", alpha=0.9, temperature=4.0)
    torch.manual_seed(1)
    student = create_model("digits_mlp", 10, hidden=16)
    with torch.no_grad():
        for x, y, idx in DataLoader(splits.train, batch_size=32, shuffle=True):  # shuffled: lookup by index
            batch = Batch(x, y, idx)
            s_out = ModelOutput(student(x))
            want = kd(s_out, live(x), batch)
            got, got16 = kd(s_out, exact(batch), batch), kd(s_out, half(batch), batch)
            for key in want:
                assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-6, abs=1e-7)
                assert float(got16[key]) == pytest.approx(float(want[key]), rel=FP16_REL, abs=1e-5)
            assert torch.allclose(exact(batch).logits, live(x).logits, atol=1e-5, rtol=0)


def test_topk_encoding_keeps_top_probabilities(tmp_path, caches):
    """Top-k rows (values, classes, logsumexp) decode to logits whose T=1 softmax keeps the top-k mass exactly."""
    import pyarrow.parquet as pq

    torch.manual_seed(0)
    logits = torch.randn(20, 10) * 3
    p = logits.softmax(1)
    assert torch.allclose(logits_from_topk(*logits.topk(10, 1), None, 10), logits)  # k = C: exact
    for k, float16 in ((3, False), (5, True)):
        table = tc.outputs_table(torch.arange(20).numpy()[::-1].copy(), logits.flip(0), k, float16)
        manifest = json.loads((caches / "c32" / tc.MANIFEST).read_text())
        manifest["dataset"].update(size=20)
        manifest["logits"] = {"stored": "topk", "topk": k, "dtype": "float16" if float16 else "float32"}
        out = tmp_path / f"k{k}"
        out.mkdir()
        pq.write_table(table.replace_schema_metadata({tc.META_KEY: json.dumps(manifest).encode()}),
                       out / tc.CACHE_FILE)
        (out / tc.MANIFEST).write_text(json.dumps(manifest))
        q = tc.load_cached_teacher(str(out)).lookup(torch.arange(20)).logits.softmax(1)
        top = p.topk(k, 1).indices
        tol = 2e-3 if float16 else 1e-5
        assert torch.allclose(q.gather(1, top), p.gather(1, top), atol=tol)
        assert torch.allclose(q.sum(1), torch.ones(20), atol=1e-5)


def test_cli_cache_then_distill_trains_student_without_teacher(caches, tmp_path, monkeypatch):
    import kdray.orchestrator.job as job

    def no_teacher(*a, **k):
        raise AssertionError("a teacher was built although teacher.cache is set")

    real_create = job.create_model

    def create_student_only(name, *a, **k):
        assert name != "digits_cnn", "the teacher model was built although teacher.cache is set"
        return real_create(name, *a, **k)

    monkeypatch.setattr(Teacher, "__init__", no_teacher)
    monkeypatch.setattr(job, "build_teacher_model", no_teacher)
    monkeypatch.setattr(job, "build_teacher", no_teacher)
    monkeypatch.setattr(job, "create_model", create_student_only)
    seen = []
    real_forward = CachedTeacher.forward
    monkeypatch.setattr(CachedTeacher, "forward", lambda self, batch: seen.append(1) or real_forward(self, batch))
    result = kdray.distill(_cache_job(tmp_path, cache=str(caches / "c32")))
    (stage,) = result.stages
    assert stage["kind"] == "distill" and seen, "the student did not train from the cache"
    assert stage["test_top1"] > 0.6, stage  # chance is 0.1; the teacher is ~0.9


def test_stale_cache_is_refused(caches, ckpt, tmp_path):
    other = tmp_path / "other.pt"
    torch.manual_seed(5)
    torch.save(create_model("digits_cnn", 10).state_dict(), other)
    with pytest.raises(kdray.ConfigError) as err:  # other weights named beside the cache
        kdray.distill(_cache_job(tmp_path, cache=str(caches / "c32"), checkpoint=str(other)))
    assert "stale" in _one_line(err) and "teacher weights" in str(err.value)

    saved = (ckpt / "t16.pt").read_bytes()  # the cache's own source checkpoint was retrained since
    shutil.copy(other, ckpt / "t16.pt")
    try:
        with pytest.raises(kdray.ConfigError) as err:
            kdray.distill(_cache_job(tmp_path, cache=str(caches / "c16")))
        assert "stale" in _one_line(err) and "t16.pt" in str(err.value)
    finally:
        (ckpt / "t16.pt").write_bytes(saved)

    with pytest.raises(kdray.ConfigError) as err:  # other dataset options
        kdray.distill(_cache_job(tmp_path, cache=str(caches / "c32"), data__options={"train_fraction": 0.3}))
    assert "stale" in _one_line(err) and "fingerprint" in str(err.value)


@pytest.mark.parametrize("method", [{"name": "at"}, {"name": "rkd"}])
def test_feature_or_relation_method_needs_features(caches, tmp_path, method):
    with pytest.raises(kdray.ConfigError) as err:
        kdray.distill(_cache_job(tmp_path, cache=str(caches / "c32"), methods=[method]))
    assert "needs teacher features" in _one_line(err) and "logits only" in str(err.value)


def test_cache_command_refusals(tmp_path, ckpt, capsys):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(digits_job(tmp_path)))  # teacher.train: not trained yet
    assert cli.main(["cache", str(config), "--output", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "trained first" in err

    job = _cache_job(tmp_path, checkpoint=str(ckpt / "t.pt"))
    with pytest.raises(kdray.ConfigError, match="not implemented") as exc:
        tc.write_cache(job, str(tmp_path / "c"), views=4)
    _one_line(exc)


def test_random_training_transform_is_refused(tmp_path, ckpt):
    from torchvision import transforms

    from kdray.data import register_dataset
    from kdray.data.registry import DatasetSplits, IndexedDataset

    class Flipped(torch.utils.data.Dataset):
        transform = transforms.Compose([transforms.RandomHorizontalFlip(), transforms.Normalize((0.5,), (0.5,))])

        def __len__(self):
            return 8

        def __getitem__(self, i):
            return self.transform(torch.zeros(1, 8, 8)), 0

    @register_dataset("cache_test_flipped", "random flips (test only)")
    def flipped(root=None, seed=0):
        ds = IndexedDataset(Flipped())
        return DatasetSplits(ds, ds, ds, 10, (1, 8, 8), "flipped")

    with pytest.raises(kdray.ConfigError, match="random .*RandomHorizontalFlip") as err:
        tc.write_cache(_cache_job(tmp_path, checkpoint=str(ckpt / "t.pt"), data={"name": "cache_test_flipped"}),
                       str(tmp_path / "c"))
    _one_line(err)
