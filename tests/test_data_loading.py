"""The per-sample path's DataLoader options (kdray.data.loading) and ImageFolder's train / eval transforms."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kdray.data import build_datasets
from kdray.data.builtin import IMAGENET_MEAN, IMAGENET_STD
from kdray.data.loading import (
    MAX_DEFAULT_WORKERS,
    available_cpus,
    default_loader_workers,
    has_random_transform,
    loader_options,
)
from kdray.data.views import ViewDataset


def test_default_workers_leave_one_cpu_and_are_capped():
    assert default_loader_workers(cpus=1) == 0
    assert default_loader_workers(cpus=2) == 1
    assert default_loader_workers(cpus=6) == 5
    assert default_loader_workers(cpus=64) == MAX_DEFAULT_WORKERS
    assert default_loader_workers() == min(MAX_DEFAULT_WORKERS, available_cpus() - 1)


def test_loader_options():
    cpu = loader_options("cpu", None, cpus=4)
    assert cpu == {"num_workers": 3, "pin_memory": False, "persistent_workers": True, "prefetch_factor": 4}
    assert loader_options("cuda", 2)["pin_memory"] is True  # the flag only: nothing runs on a GPU here
    assert loader_options("cpu", 0) == {"num_workers": 0, "pin_memory": False, "persistent_workers": False}
    # random transforms: fresh workers each epoch (seeded from the main generator the checkpoint restores)
    assert loader_options("cpu", 2, random_transform=True)["persistent_workers"] is False
    with pytest.raises(ValueError, match=">= 0"):
        loader_options("cpu", -1)


def test_options_make_a_working_loader():
    splits = build_datasets("digits")
    loader = torch.utils.data.DataLoader(splits.train, batch_size=256, **loader_options("cpu", 1))
    assert sum(len(y) for _, y, _ in loader) == len(splits.train)
    assert sum(len(y) for _, y, _ in loader) == len(splits.train)  # a second epoch on the kept worker


def test_has_random_transform():
    assert not has_random_transform(build_datasets("digits").train)
    assert not has_random_transform(build_datasets("fake", size=8).train)


def _folder(root, sizes):
    from PIL import Image

    rng = np.random.default_rng(0)
    images = {(cls, k): rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for cls in ("cat", "dog")
              for k, (w, h) in enumerate(sizes)}
    for split in ("train", "val"):  # the same images in both
        for (cls, k), img in images.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / split / cls / f"{k}.png")
    return str(root)


def test_imagefolder_train_transform_is_random_resized_crop_flip_normalise(tmp_path):
    root = _folder(tmp_path, [(40, 30), (24, 48)])  # non-square images of other sizes
    s = build_datasets("imagefolder", root=root, image_size=16)
    names = [type(t).__name__ for t in s.train.base.transform.transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert has_random_transform(s.train)
    torch.manual_seed(0)
    draws = [s.train[0][0] for _ in range(4)]
    assert all(d.shape == (3, 16, 16) for d in draws)
    assert any(not torch.equal(draws[0], d) for d in draws[1:])  # random crops
    # Recorded views over it rebuild the same view from a key (the teacher cache's contract).
    views = ViewDataset(s.train, 2, seed=1)
    assert torch.equal(views[1][0], views[1][0]) and not torch.equal(views[0][0], views[1][0])
    assert not has_random_transform(views)


def test_imagefolder_eval_transform_is_resize_centre_crop_normalise(tmp_path):
    from PIL import Image
    from torchvision.transforms import functional as F

    root = _folder(tmp_path, [(40, 30)])
    s = build_datasets("imagefolder", root=root, image_size=16)
    assert [type(t).__name__ for t in s.val.base.transform.transforms] == ["Resize", "CenterCrop", "ToTensor",
                                                                      "Normalize"]
    assert not has_random_transform(s.val)
    path = s.val.base.samples[0][0]
    with Image.open(path) as img:
        resized = F.resize(img.convert("RGB"), 18)  # shorter side round(16 / 0.875) = 18: 24 x 18
        assert resized.size == (24, 18)
        want = (F.to_tensor(F.center_crop(resized, 16)) - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) \
            / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(s.val[0][0], want, atol=1e-6)
    assert torch.equal(s.val[0][0], s.val[0][0])


def test_imagefolder_augment_false_trains_on_the_eval_transform(tmp_path):
    root = _folder(tmp_path, [(20, 20)])
    on = build_datasets("imagefolder", root=root, image_size=8)
    off = build_datasets("imagefolder", root=root, image_size=8, augment=False)
    assert not has_random_transform(off.train) and torch.equal(off.train[0][0], off.val[0][0])
    assert off.fingerprint != on.fingerprint  # a teacher cache refuses the other transform
