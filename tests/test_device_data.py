"""The device data pipeline (kdray.data.device) against the per-sample path it replaces.

CIFAR splits come from ``build_datasets("cifar10", root=...)`` on a tiny CIFAR-format folder written here (the
real pickled batch layout; torchvision's md5 check patched out), so the device path is checked against the
very torchvision CIFAR10 + transforms the per-sample path runs.
"""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils.data import DataLoader, DistributedSampler

from kdray.data import build_datasets
from kdray.data.device import (
    Augment,
    DeviceData,
    NotOnDeviceError,
    augment_params,
    can_use_device_pipeline,
    device_batches,
    device_eval_batches,
    device_refusal,
    replayed_params,
    split_base,
)
from kdray.data.views import RowSampler, ViewDataset, cached_train_data

PER_FILE = 40  # images per CIFAR batch file: 5 x 40 = 200 training images


def write_cifar(root, images: np.ndarray | None = None, per_file: int = PER_FILE, seed: int = 0):
    """A CIFAR-10-format folder: data_batch_1..5 + test_batch of ``per_file`` images each (``images``: one
    ``(3, 32, 32)`` uint8 image repeated, else random ones), and batches.meta."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = (np.tile(images.reshape(1, -1), (per_file, 1)) if images is not None
                else rng.integers(0, 256, (per_file, 3072), dtype=np.uint8))
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"data": data, "labels": rng.integers(0, 10, per_file).tolist()}, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return str(root)


@pytest.fixture
def no_md5(monkeypatch):
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)


@pytest.fixture
def cifar(tmp_path, no_md5):
    return build_datasets("cifar10", root=write_cifar(tmp_path), val_fraction=0.1)


def epoch_batches(loader, epoch):
    loader.sampler.set_epoch(epoch)  # what TrainLoop calls
    return [(x.clone(), y.clone(), i.clone()) for x, y, i in loader]


def same(a, b) -> bool:
    return len(a) == len(b) and all(all(torch.equal(p, q) for p, q in zip(u, v)) for u, v in zip(a, b))


# --- what goes on the device -------------------------------------------------------------------------------
def test_device_refusal_says_why(cifar, tmp_path):
    from PIL import Image

    assert device_refusal(cifar.train, "cpu") is None and can_use_device_pipeline(cifar.train, "cpu")
    assert device_refusal(build_datasets("digits").train, "cpu") is None
    assert device_refusal(build_datasets("fake", size=8).train, "cpu") is None
    too_big = device_refusal(cifar.train, "cpu", memory_fraction=1e-12)
    assert too_big is not None and "MiB" in too_big
    for cls in ("a", "b"):
        (tmp_path / "img" / "train" / cls).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "img" / "train" / cls / "0.png")
    folder = build_datasets("imagefolder", root=str(tmp_path / "img"), image_size=8)
    assert "ImageFolder" in device_refusal(folder.train, "cpu")
    with pytest.raises(NotOnDeviceError, match="ImageFolder"):
        device_batches(folder.train, 4, seed=0, device="cpu")


def test_unsupported_transform_is_refused(cifar):
    from torchvision import transforms as T

    base = split_base(cifar.train)[0]  # under IndexedDataset -> Subset: the CIFAR10
    base.transform = T.Compose([T.ColorJitter(0.4), T.ToTensor()])
    assert "ColorJitter" in device_refusal(cifar.train, "cpu")
    base.transform = T.Compose([T.ToTensor(), T.RandomHorizontalFlip()])  # a flip after ToTensor: other order
    assert "RandomHorizontalFlip" in device_refusal(cifar.train, "cpu")


# --- values ------------------------------------------------------------------------------------------------
def test_eval_batches_equal_per_sample_path_with_normalisation(cifar):
    """val (ToTensor + Normalize, no augmentation) and its 2-rank shards: the same values as torchvision's."""
    from kdray.data.builtin import CIFAR_MEAN, CIFAR_STD

    ref = torch.stack([cifar.val[i][0] for i in range(len(cifar.val))])
    x, y, idx = next(iter(device_eval_batches(cifar.val, 256, device="cpu")))
    assert torch.equal(x, ref) and idx.tolist() == list(range(len(cifar.val)))
    assert y.tolist() == [cifar.val[i][1] for i in range(len(cifar.val))]
    shards = [next(iter(device_eval_batches(cifar.val, 256, device="cpu", rank=r, world_size=2)))[2].tolist()
              for r in range(2)]
    assert shards == [list(range(0, len(cifar.val), 2)), list(range(1, len(cifar.val), 2))]
    # Normalisation arithmetic: byte b of channel c is (b / 255 - mean_c) / std_c; padding is byte 0.
    d = DeviceData(torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 2, 2).contiguous(),
                   torch.zeros(1, dtype=torch.long), CIFAR_MEAN["cifar10"], CIFAR_STD["cifar10"])
    x = d.normalise(d.images.clone())
    want = [(b / 255 - m) / s for b, m, s in zip((0, 128, 255), CIFAR_MEAN["cifar10"], CIFAR_STD["cifar10"])]
    assert torch.allclose(x[0, :, 0, 0], torch.tensor(want), atol=1e-6)


def test_digits_and_fake_equal_per_sample_values():
    for splits in (build_datasets("digits"), build_datasets("fake", size=64)):
        x, y, idx = next(iter(device_batches(splits.train, 32, seed=0, device="cpu")))
        assert torch.equal(x, torch.stack([splits.train[int(i)][0] for i in idx]))
        assert y.tolist() == [splits.train[int(i)][1] for i in idx]


def test_recorded_views_equal_view_dataset_rows(cifar):
    """With a cache of recorded views the device batches carry the per-sample path's row ids, in its order,
    and each row's input is exactly the view ViewDataset rebuilds from the row's key."""
    from kdray.algorithms.cached_teacher import CachedTeacher

    n, views = len(cifar.train), 3
    cache = CachedTeacher(torch.randn(n * views, 10), views=views, view_seed=11, num_samples=n)
    loader = device_batches(cifar.train, 32, seed=5, device="cpu", cache=cache)
    sampler = DistributedSampler(cifar.train, 1, 0, shuffle=True, seed=5)
    dataset, row_sampler = cached_train_data(cifar.train, cache, sampler, 5, 1)
    reference = DataLoader(dataset, batch_size=32, sampler=row_sampler)
    assert isinstance(dataset, ViewDataset) and isinstance(row_sampler, RowSampler)
    for epoch in (0, 2):
        row_sampler.set_epoch(epoch)
        ref = [(x, y, r) for x, y, r in reference]
        got = epoch_batches(loader, epoch)
        assert same(got, ref)
    assert len({int(r) % views for _, _, rows in got for r in rows}) == views  # the views really differ


def test_sharded_cache_rows_are_this_workers(cifar):
    from kdray.algorithms.base import Batch
    from kdray.algorithms.cached_teacher import CachedTeacher
    from kdray.data.views import shard_of

    n, views, world = len(cifar.train), 2, 2
    for rank in range(world):
        samples = shard_of(n, rank, world)
        rows = (samples[:, None] * views + np.arange(views)).reshape(-1)
        cache = CachedTeacher(torch.randn(len(rows), 10), rows=torch.from_numpy(rows), views=views, view_seed=3,
                              num_samples=n)
        loader = device_batches(cifar.train, 16, seed=0, device="cpu", rank=rank, world_size=world, cache=cache)
        seen = torch.cat([r for _, _, r in epoch_batches(loader, 1)])
        assert set((seen // views).tolist()) == set(samples.tolist())
        x, y, r = next(iter(loader))
        cache(Batch(x, y, r))  # every row is held here (a KeyError otherwise)


# --- order, reproducibility, resume, sharding ---------------------------------------------------------------
def test_order_equals_make_loaders_dataloader(cifar):
    """Same samples, same order, same batch cut as DataLoader + DistributedSampler, per rank and epoch."""
    for rank in range(2):
        loader = device_batches(cifar.train, 24, seed=7, device="cpu", rank=rank, world_size=2)
        sampler = DistributedSampler(cifar.train, 2, rank, shuffle=True, seed=7)
        ref = DataLoader(cifar.train, batch_size=24, sampler=sampler)
        for epoch in (0, 3):
            sampler.set_epoch(epoch)
            got = epoch_batches(loader, epoch)
            want = [(y, i) for _, y, i in ref]
            assert len(loader) == len(ref) == len(got)
            assert all(torch.equal(g[1], w[0]) and torch.equal(g[2], w[1]) for g, w in zip(got, want))


def test_same_seed_and_epoch_same_batches_other_epoch_other_batches(cifar):
    a = device_batches(cifar.train, 32, seed=1, device="cpu")
    b = device_batches(cifar.train, 32, seed=1, device="cpu")
    assert same(epoch_batches(a, 4), epoch_batches(b, 4))
    e4, e5 = epoch_batches(a, 4), epoch_batches(a, 5)
    assert not torch.equal(e4[0][2], e5[0][2])  # another shuffle
    # the same sample gets another crop/flip in another epoch (for most samples)
    views = {}
    for epoch, batches in ((4, e4), (5, e5)):
        for x, _, idx in batches:
            for k, i in enumerate(idx.tolist()):
                views.setdefault(i, []).append(x[k])
    differ = sum(not torch.equal(u, v) for u, v in views.values())
    assert differ > 0.8 * len(views)
    other_seed = device_batches(cifar.train, 32, seed=2, device="cpu")
    assert not same(epoch_batches(other_seed, 4), e4)


def test_resumed_epoch_equals_uninterrupted_run(cifar):
    uninterrupted = device_batches(cifar.train, 32, seed=3, device="cpu")
    runs = [epoch_batches(uninterrupted, e) for e in range(4)]
    resumed = device_batches(cifar.train, 32, seed=3, device="cpu")  # a new process: a new loader
    assert same(epoch_batches(resumed, 3), runs[3])
    assert same(epoch_batches(resumed, 1), runs[1])


def test_two_ranks_cover_the_epoch_once(cifar):
    n = len(cifar.train)  # 180: even, no DistributedSampler padding
    per_rank = [torch.cat([i for _, _, i in epoch_batches(
        device_batches(cifar.train, 16, seed=9, device="cpu", rank=r, world_size=2), 2)]) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == n // 2
    assert sorted(torch.cat(per_rank).tolist()) == list(range(n))


def test_train_loop_resumes_exactly_on_device_batches():
    """TrainLoop consumes DeviceBatches (it calls loader.sampler.set_epoch): 2 epochs in one go equal 1 epoch,
    a checkpoint, and 1 more epoch in a new loop."""
    from kdray.algorithms.distiller import Distiller
    from kdray.algorithms.engine import TrainLoop, seed_everything
    from kdray.models import create_model

    splits = build_datasets("digits")

    def loop():
        seed_everything(0)
        distiller = Distiller(create_model("digits_mlp", 10))
        opt = torch.optim.SGD(distiller.parameters(), lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, 1)
        return TrainLoop(distiller, None, opt, sched, device_batches(splits.train, 64, seed=0, device="cpu"),
                         device_eval_batches(splits.val, device="cpu"), 10, 2, torch.device("cpu"))

    full = loop()
    full.run()
    first = loop()
    first.epochs = 1
    first.run()
    state = first.state_dict()
    second = loop()
    second.load_state_dict(state)
    second.run()
    for p, q in zip(full.distiller.parameters(), second.distiller.parameters()):
        assert torch.equal(p, q)
    assert full.history[1]["val_top1"] == second.history[0]["val_top1"]


# --- the augmentation's distribution -----------------------------------------------------------------------
def _position_image() -> np.ndarray:
    """(3, 32, 32) uint8: channel 0 = 1 + 7 * row, channel 1 = 1 + 7 * column (0 only in the padding)."""
    r, c = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    return np.stack([1 + 7 * r, 1 + 7 * c, np.full_like(r, 200)]).astype(np.uint8)


def _crop_of(img: torch.Tensor) -> tuple[int, int, int]:
    """(dy, dx, flip) of a crop of the padded position image, read at the centre (never padding)."""
    byte = (img * 255).round().long()
    row, col, col_next = byte[0, 16, 16], byte[1, 16, 16], byte[1, 16, 17]
    flip = int(col_next < col)
    r, c = (int(row) - 1) // 7, (int(col) - 1) // 7
    dy = r - 16 + 4
    dx = (c - (31 - 16) + 4) if flip else (c - 16 + 4)
    return dy, dx, flip


def _homogeneity_p(a: list, b: list) -> float:
    cells = sorted(set(a) | set(b))
    table = np.array([[x.count(cell) for cell in cells] for x in (a, b)])
    return stats.chi2_contingency(table)[1]


def test_crop_and_flip_distribution_equals_torchvision(tmp_path, no_md5):
    """Joint (row offset, column offset, flip) of the device path over 1,000 samples x 4 epochs against 4,000
    draws of torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip: chi-square homogeneity over the
    9 x 9 x 2 = 162 cells, and each marginal against uniform / Bernoulli(0.5), p > 0.001 (a real
    difference of a 0.5 vs 0.4 flip rate is caught by the same test at these sizes: checked below)."""
    from PIL import Image
    from torchvision import transforms as T

    img = _position_image()
    root = write_cifar(tmp_path, images=img, per_file=200)
    splits = build_datasets("cifar10", root=root, val_fraction=0.0, augment=True)
    base = split_base(splits.train)[0]
    base.transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()])
    loader = device_batches(splits.train, 500, seed=0, device="cpu")
    device = [_crop_of(x) for e in range(4) for xb, _, _ in epoch_batches(loader, e) for x in xb]
    torch.manual_seed(0)
    pil = Image.fromarray(img.transpose(1, 2, 0))
    tv = [_crop_of(base.transform(pil)) for _ in range(len(device))]
    assert all(0 <= dy <= 8 and 0 <= dx <= 8 for dy, dx, _ in device + tv)
    assert _homogeneity_p(device, tv) > 1e-3
    for k, cells in ((0, 9), (1, 9), (2, 2)):
        counts = np.bincount([d[k] for d in device], minlength=cells)
        assert stats.chisquare(counts).pvalue > 1e-3, (k, counts)
    # Power: the same test rejects a flip rate of 0.4 (device parameters drawn with Augment(4, 0.4)).
    params = augment_params(0, np.arange(len(device)), 0, Augment(4, 0.4))
    biased = [tuple(p) for p in params.tolist()]
    assert _homogeneity_p(biased, tv) < 1e-3


def test_augment_params_are_a_function_of_seed_epoch_sample():
    aug = Augment(4, 0.5)
    a = augment_params(1, np.arange(100), 3, aug)
    assert np.array_equal(a[[5, 7]], augment_params(1, np.array([5, 7]), 3, aug))  # not of the batch layout
    assert not np.array_equal(a, augment_params(1, np.arange(100), 4, aug))
    assert not np.array_equal(a, augment_params(2, np.arange(100), 3, aug))


@pytest.mark.parametrize("augment", [Augment(4, 0.5), Augment(2, 0.3), Augment(0, 0.5), Augment(3, 0.0)])
def test_replayed_params_equal_torch_generator_draws(augment):
    """The vectorised replay of recorded views equals what torchvision draws from torch's generator seeded with
    each key (500 keys, incl. keys above 2**32)."""
    keys = np.random.default_rng(1).integers(0, 2**63 - 1, 500)
    got = replayed_params(keys, augment)
    g, span = torch.Generator(), 2 * augment.padding + 1
    for key, row in zip(keys.tolist(), got.tolist()):
        g.manual_seed(key)
        dy = int(torch.randint(0, span, (1,), generator=g)) if augment.padding else 0
        dx = int(torch.randint(0, span, (1,), generator=g)) if augment.padding else 0
        flip = int(bool(torch.rand(1, generator=g) < augment.flip)) if augment.flip else 0
        assert row == [dy, dx, flip], key
