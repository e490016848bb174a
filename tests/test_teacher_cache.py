"""Teacher-output cache: `kdray cache` (Ray Data actor pool -> Parquet), students trained from it with no teacher.

Two Ray Data passes per session (a float32 cache via the CLI, a float16 one via the API); the top-k encoding is
checked without Ray. Float16 tolerance: a logit is stored with relative error <= 2**-11 (~4.9e-4), so a KD loss
computed from float16 logits is compared at rel 2e-3.
"""
from __future__ import annotations

import dataclasses
import json
import math
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
from kdray.orchestrator import cache_store as cs
from kdray.orchestrator import teacher_cache as tc
from kdray.orchestrator.weights import load_weights
from jobs import digits_job

DIGITS = {"train_fraction": 0.2}
FP16_REL = 2e-3
AUG = "cache_test_digits_aug"  # digits under a random shift: a training transform that needs recorded views
VIEWS = 3


class Augmented(torch.utils.data.Dataset):
    """A digits training split shifted at random by up to ``padding`` pixels (torchvision ``RandomCrop``)."""

    def __init__(self, base, padding: int):
        from torchvision import transforms

        self.base, self.transform = base, transforms.RandomCrop(8, padding=padding)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i][:2]
        return self.transform(x), y


def _register_augmented_digits():
    from kdray.data import register_dataset
    from kdray.data.registry import IndexedDataset

    @register_dataset(AUG, "digits with random shifts (test only)")
    def digits_aug(root=None, seed=0, padding=1, **options):
        # The same images as digits (same fingerprint): only the training transform differs, which the
        # cache's transform fingerprint has to catch.
        splits = build_datasets("digits", seed=seed, **options)
        return dataclasses.replace(splits, train=IndexedDataset(Augmented(splits.train.base, padding)))


_register_augmented_digits()


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


def _assert_cached_kd_equals_live(kd, student, batch, live, exact, half) -> None:
    """KD loss from the float32 cache equals the live teacher's to 1e-6 (float16 cache: FP16_REL), and so
    do the looked-up logits."""
    s_out = ModelOutput(student(batch.inputs))
    want = kd(s_out, live(batch.inputs), batch)
    got, got16 = kd(s_out, exact(batch), batch), kd(s_out, half(batch), batch)
    for key in want:
        assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-6, abs=1e-7)
        assert float(got16[key]) == pytest.approx(float(want[key]), rel=FP16_REL, abs=1e-5)
    assert torch.allclose(exact(batch).logits, live(batch.inputs).logits, atol=1e-5, rtol=0)


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text and text, text
    return text


@pytest.mark.ray  # its cache fixture is built on Ray (Ray Data)
def test_cache_files_hold_identity(caches, ckpt, splits):
    manifest = json.loads((caches / "c32" / tc.MANIFEST).read_text())
    assert manifest == tc.read_manifest(str(caches / "c32"))  # schema metadata == manifest.json
    assert manifest["dataset"]["fingerprint"] == splits.fingerprint and manifest["dataset"]["size"] == len(splits.train)
    assert manifest["teacher"]["state_sha256"] == tc.state_dict_hash(torch.load(ckpt / "t.pt", weights_only=True))
    assert manifest["views"] == {"kind": "fixed", "count": 1} and manifest["features"] == []
    import pyarrow.parquet as pq

    table = pq.read_table(caches / "c32" / tc.CACHE_FILE)
    assert table.column_names == ["index", "view", "aug_key", "logits"]
    assert set(table.column("view").to_pylist()) == {0} and set(table.column("aug_key").to_pylist()) == {-1}
    assert table.column("index").to_pylist() == list(range(len(splits.train)))


@pytest.mark.ray  # its cache fixture is built on Ray (Ray Data)
def test_cached_kd_loss_equals_live_kd_loss(caches, ckpt, splits):
    live = _live_teacher(ckpt)
    exact = cs.load_cached_teacher(str(caches / "c32"))
    half = cs.load_cached_teacher(str(caches / "c16"))
    kd = create_method("kd", alpha=0.9, temperature=4.0)
    torch.manual_seed(1)
    student = create_model("digits_mlp", 10, hidden=16)
    with torch.no_grad():
        for x, y, idx in DataLoader(splits.train, batch_size=32, shuffle=True):  # shuffled: lookup by index
            _assert_cached_kd_equals_live(kd, student, Batch(x, y, idx), live, exact, half)


@pytest.mark.ray  # its cache fixture is built on Ray (Ray Data)
def test_topk_encoding_keeps_top_probabilities(tmp_path, caches):
    """Top-k rows (values, classes, logsumexp) decode to logits whose T=1 softmax keeps the top-k mass exactly."""
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
        tc.save_cache(str(out), table, manifest)
        q = cs.load_cached_teacher(str(out)).lookup(torch.arange(20)).logits.softmax(1)
        top = p.topk(k, 1).indices
        tol = 2e-3 if float16 else 1e-5
        assert torch.allclose(q.gather(1, top), p.gather(1, top), atol=tol)
        assert torch.allclose(q.sum(1), torch.ones(20), atol=1e-5)


@pytest.mark.ray  # its cache fixture is built on Ray (Ray Data)
def test_cli_cache_then_distill_trains_student_without_teacher(caches, tmp_path, monkeypatch):
    import kdray.orchestrator.build as build
    import kdray.orchestrator.job as job

    def no_teacher(*a, **k):
        raise AssertionError("a teacher was built although teacher.cache is set")

    real_create = job.create_model

    def create_student_only(name, *a, **k):
        assert name != "digits_cnn", "the teacher model was built although teacher.cache is set"
        return real_create(name, *a, **k)

    monkeypatch.setattr(Teacher, "__init__", no_teacher)
    monkeypatch.setattr(build, "build_teacher_model", no_teacher)  # the builder: the one maker of teachers
    monkeypatch.setattr(build, "build_teacher", no_teacher)
    monkeypatch.setattr(build, "create_model", create_student_only)
    monkeypatch.setattr(job, "create_model", create_student_only)
    seen = []
    real_forward = CachedTeacher.forward
    monkeypatch.setattr(CachedTeacher, "forward", lambda self, batch: seen.append(1) or real_forward(self, batch))
    result = kdray.distill(_cache_job(tmp_path, cache=str(caches / "c32")))
    (stage,) = result.stages
    assert stage["kind"] == "distill" and seen, "the student did not train from the cache"
    assert stage["test_top1"] > 0.6, stage  # chance is 0.1; the teacher is ~0.9


@pytest.mark.ray  # its cache fixture is built on Ray (Ray Data)
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


@pytest.mark.ray  # its cache fixture is built on Ray (Ray Data)
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
    with pytest.raises(kdray.ConfigError, match="deterministic, so every view would be the same") as exc:
        tc.write_cache(job, str(tmp_path / "c"), views=4)  # digits: no random transform to record
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


# --- recorded views (N augmentations per sample) ------------------------------------------------------------
def _aug_job(tmp_path, cache=None, checkpoint=None, padding=None, **over) -> dict:
    options = {**DIGITS, **({"padding": padding} if padding is not None else {})}
    return _cache_job(tmp_path, cache, checkpoint, data={"name": AUG, "options": options}, **over)


@pytest.fixture(scope="module")
def view_caches(ray_session, ckpt, tmp_path_factory):
    """Two Ray Data passes over digits under random shifts: 3 recorded views per sample, float32 and float16."""
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors cannot import this test module
    root = tmp_path_factory.mktemp("views")
    job = _aug_job(root, checkpoint=str(ckpt / "t.pt"))
    tc.write_cache(job, str(root / "v32"), views=VIEWS, view_seed=3, actors=1)
    tc.write_cache(job, str(root / "v16"), views=VIEWS, view_seed=3, float16=True, actors=1)
    return root


def test_view_keys_and_samplers():
    """Unit checks (no cache): a view is rebuilt exactly from its key without touching anyone's RNG; each
    sample cycles through its views; shards are disjoint, cover the set and give every worker the same length."""
    import numpy as np
    from torch.utils.data import DistributedSampler

    from kdray.data import views as V

    assert V.view_key(3, 7, 2) == int(V.view_key(3, np.array([7]), np.array([2]))[0]) >= 0
    assert len({V.view_key(s, i, v) for s in (0, 1) for i in range(50) for v in range(4)}) == 400
    ds = V.ViewDataset(build_datasets(AUG, **DIGITS).train, VIEWS, seed=3)
    torch.manual_seed(11)
    before = torch.get_rng_state()
    a, b = ds[5 * VIEWS + 1], ds[5 * VIEWS + 1]
    assert torch.equal(torch.get_rng_state(), before), "rebuilding a view moved the global generator"
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:] == (a[1], 5 * VIEWS + 1)
    assert any(not torch.equal(ds[i * VIEWS][0], ds[i * VIEWS + 1][0]) for i in range(10)), "views do not differ"

    n = 10
    rows = V.RowSampler(DistributedSampler(range(n), 1, 0, shuffle=True, seed=0), VIEWS, seed=0)
    seen = {}
    for epoch in range(VIEWS):
        rows.set_epoch(epoch)
        epoch_rows = list(rows)
        assert sorted(r // VIEWS for r in epoch_rows) == list(range(n))  # every sample once per epoch
        for r in epoch_rows:
            seen.setdefault(r // VIEWS, []).append(r % VIEWS)
    assert all(sorted(v) == list(range(VIEWS)) for v in seen.values())  # every view once per VIEWS epochs
    two = V.RowSampler(DistributedSampler(range(n), 1, 0, shuffle=True, seed=0), VIEWS, use_views=2, seed=0)
    assert {r % VIEWS for e in range(4) for r in (two.set_epoch(e) or list(two))} == {0, 1}

    n, world = 11, 2
    shards = [V.ShardSampler(V.shard_of(n, r, world), n, world, seed=4) for r in range(world)]
    held = [set(V.shard_of(n, r, world).tolist()) for r in range(world)]
    assert not held[0] & held[1] and held[0] | held[1] == set(range(n))
    for epoch in (0, 1):
        for r, sampler in enumerate(shards):
            sampler.set_epoch(epoch)
            order = list(sampler)
            assert len(order) == math.ceil(n / world) and set(order) == held[r] and order == list(sampler)
    shards[0].set_epoch(0)
    first = list(shards[0])
    shards[0].set_epoch(1)
    assert list(shards[0]) != first  # reshuffled per epoch, reproducibly


@pytest.mark.ray  # its cache fixture is built on Ray (Ray Data)
def test_recorded_views_kd_loss_equals_live_kd_loss(view_caches, ckpt):
    """The student's loader rebuilds each row's view from its key; the teacher saw that exact view in another
    process, so cached and live KD losses agree (float32 1e-6, float16 2e-3) on every recorded view."""
    from torch.utils.data import DistributedSampler

    from kdray.data.views import cached_train_data

    splits = build_datasets(AUG, **DIGITS)
    live = _live_teacher(ckpt)
    exact = cs.load_cached_teacher(str(view_caches / "v32"))
    half = cs.load_cached_teacher(str(view_caches / "v16"))
    assert exact.views == VIEWS and exact.num_rows == VIEWS * len(splits.train) and exact.view_seed == 3
    dataset, sampler = cached_train_data(splits.train, exact, DistributedSampler(splits.train, 1, 0, seed=0), 0, 1)
    kd = create_method("kd", alpha=0.9, temperature=4.0)
    torch.manual_seed(1)
    student = create_model("digits_mlp", 10, hidden=16)
    views_seen = set()
    with torch.no_grad():
        for epoch in range(2):
            sampler.set_epoch(epoch)
            for x, y, rows in DataLoader(dataset, batch_size=64, sampler=sampler):
                views_seen |= set((rows % VIEWS).tolist())
                _assert_cached_kd_equals_live(kd, student, Batch(x, y, rows), live, exact, half)
    assert views_seen == set(range(VIEWS))
    plain = torch.stack([splits.train[i][0] for i in range(20)])  # a fresh random shift is not a recorded view
    recorded = torch.stack([dataset[i * VIEWS][0] for i in range(20)])
    assert not torch.equal(plain, recorded)


@pytest.mark.ray  # its cache fixture is built on Ray (Ray Data)
def test_random_transform_trains_from_views_cache(view_caches, tmp_path, monkeypatch):
    import kdray.orchestrator.build as build

    def no_teacher(*a, **k):
        raise AssertionError("a teacher was built although teacher.cache is set")

    monkeypatch.setattr(build, "build_teacher_model", no_teacher)
    monkeypatch.setattr(build, "build_teacher", no_teacher)
    rows = []
    real_forward = CachedTeacher.forward
    monkeypatch.setattr(CachedTeacher, "forward", lambda self, batch: rows.append(batch.indices) or
                        real_forward(self, batch))
    result = kdray.distill(_aug_job(tmp_path, cache=str(view_caches / "v32"), train__epochs=30))
    (stage,) = result.stages
    seen = torch.cat(rows)
    assert set((seen % VIEWS).tolist()) == set(range(VIEWS)), "the student did not cycle through the views"
    assert stage["test_top1"] > 0.6, stage  # chance is 0.1; the teacher gets ~0.67 on the shifted views


@pytest.mark.ray  # its cache fixture is built on Ray (Ray Data)
def test_mismatched_views_are_refused(view_caches, caches, tmp_path):
    v32 = str(view_caches / "v32")
    with pytest.raises(kdray.ConfigError) as err:  # more views than recorded
        kdray.distill(_aug_job(tmp_path, cache=v32, teacher__cache_views=VIEWS + 1))
    assert f"holds {VIEWS} recorded view(s)" in _one_line(err) and "--views" in str(err.value)

    with pytest.raises(kdray.ConfigError) as err:  # another random transform (shifts of up to 2 pixels)
        kdray.distill(_aug_job(tmp_path, cache=v32, padding=2))
    assert "stale" in _one_line(err) and "training transform" in str(err.value) and "padding=2" in str(err.value)

    with pytest.raises(kdray.ConfigError) as err:  # a fixed-view cache of the same images, now augmented
        kdray.distill(_aug_job(tmp_path, cache=str(caches / "c32")))
    assert "holds fixed views" in _one_line(err) and "--views N" in str(err.value)

    import pyarrow.parquet as pq  # a cache whose manifest seed no longer derives its stored keys

    bad = tmp_path / "bad"
    manifest = tc.read_manifest(v32)
    manifest["views"]["seed"] = 4
    tc.save_cache(str(bad), pq.read_table(view_caches / "v32" / tc.CACHE_FILE), manifest)
    with pytest.raises(kdray.ConfigError) as err:
        kdray.distill(_aug_job(tmp_path, cache=str(bad)))
    assert "augmentation keys differ" in _one_line(err)


# --- data-parallel students read the cache as shards ---------------------------------------------------------
def _shard_teachers(path, world: int = 2):
    """Each rank's shard of a cache, as its Ray Dataset would hand it over (filtered with the same function)."""
    import pyarrow.parquet as pq

    manifest = tc.read_manifest(str(path))
    table = pq.read_table(path / tc.CACHE_FILE, columns=cs.logits_columns(manifest))
    return [cs.teacher_from_table(cs.keep_shard(table, r, world), manifest, str(path), shard=(r, world))
            for r in range(world)]


@pytest.mark.ray  # its cache fixture is built on Ray (Ray Data)
def test_sharded_cache_holds_only_its_rows(caches, view_caches):
    from torch.utils.data import DistributedSampler

    from kdray.data.views import cached_train_data

    for name in ("c32", "v32"):
        root = caches if name == "c32" else view_caches
        full = cs.load_cached_teacher(str(root / name))
        shards = _shard_teachers(root / name)
        n, views = full.num_samples, full.views
        assert [s.num_rows for s in shards] == [math.ceil(n / 2) * views, n // 2 * views]  # 1/world of the rows
        assert sum(s.logits.nbytes for s in shards) == full.logits.nbytes
        for rank, shard in enumerate(shards):
            assert torch.equal(shard.lookup(shard.rows).logits, full.lookup(shard.rows).logits)
            with pytest.raises(KeyError, match="not in this worker's shard"):
                shard.lookup(shards[1 - rank].rows[:1])
            data = build_datasets(AUG if views > 1 else "digits", **DIGITS)
            _, sampler = cached_train_data(data.train, shard, DistributedSampler(data.train, 2, rank, seed=0), 0, 2)
            sampler.set_epoch(1)
            rows = torch.tensor(list(sampler))
            assert len(rows) == math.ceil(n / 2) and bool(torch.isin(rows, shard.rows).all())


@pytest.mark.ray  # its cache fixture is built on Ray (Ray Data)
def test_data_parallel_run_reads_cache_shards(caches, tmp_path, monkeypatch):
    """One 2-worker Ray Train run from the cache: each worker materialises only its Ray Data shard (half the
    rows) and trains on exactly those samples. The same batches in one process (each step = rank 0's half-batch
    + rank 1's, which is what DDP's gradient averaging computes) give the same accuracies to within one sample
    (float sums in another order, ~1e-7 per step, cannot flip more than a near-tie)."""
    import kdray.orchestrator.job as job

    c32 = caches / "c32"
    ray_run = kdray.distill(_cache_job(tmp_path / "ray", cache=str(c32), ray={"num_workers": 2}))
    (dp,) = ray_run.stages
    splits = build_datasets("digits", **DIGITS)
    n = len(splits.train)
    assert dp["cache_rows"] == n and dp["cache_rows_held_max"] == math.ceil(n / 2), dp

    shards = _shard_teachers(c32)
    real_make_loaders = job.make_loaders

    class TwoWorkerBatches:
        """Rank 0's and rank 1's batches of one step, concatenated."""

        def __init__(self, loaders):
            self.loaders = loaders
            self.sampler = self

        def set_epoch(self, epoch):
            for loader in self.loaders:
                loader.sampler.set_epoch(epoch)

        def __iter__(self):
            for parts in zip(*self.loaders, strict=True):
                yield tuple(torch.cat(p) for p in zip(*parts))

    def two_worker_loaders(splits, batch_size, seed, ctx, loader_workers=0, cache=None, **options):
        _, val, test = real_make_loaders(splits, batch_size, seed, ctx, loader_workers)
        ranks = [real_make_loaders(splits, batch_size, seed, job.WorkerContext(rank=r, world_size=2),
                                   loader_workers, shards[r])[0] for r in (0, 1)]
        return TwoWorkerBatches(ranks), val, test

    monkeypatch.setattr(job, "make_loaders", two_worker_loaders)
    (local,) = kdray.distill(_cache_job(tmp_path / "local", cache=str(c32))).stages
    test_n = len(splits.test)
    assert abs(dp["test_top1"] - local["test_top1"]) <= 1 / test_n + 1e-9, (dp, local)
    assert abs(dp["val_top1"] - local["val_top1"]) <= 1 / len(splits.val) + 1e-9, (dp, local)
    assert dp["test_top1"] > 0.6
