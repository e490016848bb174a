"""Built-in datasets: digits (embedded default), CIFAR-10/100, ImageFolder, FakeData."""
from __future__ import annotations

import functools
import hashlib
import os

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from kdray.data.registry import (
    DatasetFilesMissingError,
    DatasetSplits,
    IndexedDataset,
    UnreadableFileError,
    register_dataset,
    split_indices,
    subsample,
)

CIFAR_MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
CIFAR_STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}


def _fingerprint(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _splits(train, val, test, num_classes, shape, fingerprint, classes=None, check_files=None) -> DatasetSplits:
    return DatasetSplits(
        IndexedDataset(train), IndexedDataset(val), IndexedDataset(test), num_classes, shape, fingerprint,
        list(classes or []), check_files,
    )


@register_dataset("digits", "scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes); no download")
def digits(root=None, seed: int = 0, train_fraction: float = 1.0, val_fraction: float = 0.2,
           test_fraction: float = 0.2) -> DatasetSplits:
    """Deterministic split (fixed by ``seed``, default 0) of the 1797 images, scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    full = TensorDataset(x, y)
    tr, va, te = split_indices(len(full), (val_fraction, test_fraction), seed)
    train = subsample(Subset(full, tr), train_fraction, seed)
    fp = _fingerprint("digits", seed, train_fraction, val_fraction, test_fraction)
    return _splits(train, Subset(full, va), Subset(full, te), 10, (1, 8, 8), fp, [str(c) for c in bunch.target_names])


def _cifar(name: str, root, seed: int, download: bool, augment: bool, train_fraction: float,
           val_fraction: float):
    from torchvision import datasets, transforms

    if root is None:
        raise DatasetFilesMissingError(f"dataset {name!r} needs data.root (a folder holding or receiving its files)")
    norm = transforms.Normalize(CIFAR_MEAN[name], CIFAR_STD[name])
    plain = transforms.Compose([transforms.ToTensor(), norm])
    train_tf = (
        transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                            transforms.ToTensor(), norm])
        if augment else plain
    )
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        train_full = cls(root, train=True, transform=train_tf, download=download)
        eval_full = cls(root, train=True, transform=plain, download=False)
        test = cls(root, train=False, transform=plain, download=False)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise DatasetFilesMissingError(
            f"{name} files not found under {root} ({err}); set data.download: true or point data.root at them"
        ) from None
    except OSError as err:  # data.download with no network: urllib's URLError (an OSError), DNS or socket errors
        reason = getattr(err, "reason", None) or err
        raise DatasetFilesMissingError(
            f"{name}: downloading {cls.url} failed ({reason}): no network here? Fetch {cls.filename} elsewhere and put "
            f"it (or its extracted {cls.base_folder}/) in data.root {root}, then run without data.download"
        ) from None
    n = len(train_full)
    tr, va, _ = split_indices(n, (val_fraction, 0.0), seed)
    train = subsample(Subset(train_full, tr), train_fraction, seed)
    val = Subset(eval_full, va) if va else Subset(test, range(0))
    classes = 10 if name == "cifar10" else 100
    fp = _fingerprint(name, seed, augment, train_fraction, val_fraction, n)
    return _splits(train, val, test, classes, (3, 32, 32), fp, train_full.classes)


@register_dataset("cifar10", "torchvision CIFAR-10 (data.root; downloads only with data.download: true)")
def cifar10(root=None, seed: int = 0, download: bool = False, augment: bool = True, train_fraction: float = 1.0,
            val_fraction: float = 0.0):
    return _cifar("cifar10", root, seed, download, augment, train_fraction, val_fraction)


@register_dataset("cifar100", "torchvision CIFAR-100 (data.root; downloads only with data.download: true)")
def cifar100(root=None, seed: int = 0, download: bool = False, augment: bool = True, train_fraction: float = 1.0,
             val_fraction: float = 0.0):
    return _cifar("cifar100", root, seed, download, augment, train_fraction, val_fraction)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: Eval images are resized so that the centre crop keeps this fraction of the shorter side (ImageNet's 224/256).
EVAL_CROP_FRACTION = 0.875


def imagefolder_transforms(image_size: int, augment: bool = True):
    """``(train, eval)`` transforms of ImageFolder data (the standard ImageNet recipe): train
    ``RandomResizedCrop(image_size)`` + ``RandomHorizontalFlip`` + ``ToTensor`` + ``Normalize`` (ImageNet
    mean/std); eval ``Resize(round(image_size / 0.875))`` (shorter side) + ``CenterCrop(image_size)`` +
    ``ToTensor`` + ``Normalize``. ``augment=False``: the eval transform for training too (deterministic, so a
    fixed-view teacher cache can cover it)."""
    from torchvision import transforms

    norm = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    eval_tf = transforms.Compose([transforms.Resize(int(round(image_size / EVAL_CROP_FRACTION))),
                                  transforms.CenterCrop(image_size), transforms.ToTensor(), norm])
    if not augment:
        return eval_tf, eval_tf
    train_tf = transforms.Compose([transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), norm])
    return train_tf, eval_tf


@register_dataset("imagefolder", "torchvision ImageFolder: data.root/{train,val[,test]}/<class>/<image>")
def imagefolder(root=None, seed: int = 0, image_size: int = 224, train_fraction: float = 1.0,
                augment: bool = True):
    """Training images get ``RandomResizedCrop`` + flip + ImageNet normalisation (``augment: false``: the eval
    transform), val/test ``Resize`` + ``CenterCrop`` + normalisation (:func:`imagefolder_transforms`)."""
    from torchvision import datasets

    if root is None or not os.path.isdir(os.path.join(root, "train")):
        raise DatasetFilesMissingError(f"imagefolder needs data.root with a train/ folder; got {root!r}")
    train_tf, eval_tf = imagefolder_transforms(image_size, augment)

    def folder(path, tf):
        try:
            return datasets.ImageFolder(path, transform=tf)
        except FileNotFoundError as err:  # no class folders, or classes without image files
            raise DatasetFilesMissingError(f"imagefolder {path}: {str(err).split('. ')[0].rstrip('.')}; put images in "
                                           f"{path}/<class>/") from None

    train = folder(os.path.join(root, "train"), train_tf)
    val_dir = os.path.join(root, "val")
    val = folder(val_dir, eval_tf) if os.path.isdir(val_dir) else Subset(train, range(0))
    test_dir = os.path.join(root, "test")
    test = folder(test_dir, eval_tf) if os.path.isdir(test_dir) else val
    fp = _fingerprint("imagefolder", root, image_size, seed, train_fraction, len(train), augment)
    files = [path for ds in (train, val, test) for path, _ in getattr(ds, "samples", [])]
    return _splits(subsample(train, train_fraction, seed), val, test, len(train.classes),
                   (3, image_size, image_size), fp, train.classes, functools.partial(check_images, files))


def check_images(paths: list[str]) -> None:
    """Every file must open as an image (PIL reads its header only: ~56 us a file measured here, so ~70 s for
    ImageNet's 1.28M, once before training), else a one-line :class:`UnreadableFileError` naming it: ImageFolder
    picks files by extension only, and a bad one would otherwise fail its batch mid-run."""
    from PIL import Image

    for path in dict.fromkeys(paths):
        try:
            with Image.open(path):
                pass
        except OSError as err:  # PIL.UnidentifiedImageError is an OSError
            reason = "PIL cannot identify it" if type(err).__name__ == "UnidentifiedImageError" else err
            raise UnreadableFileError(f"imagefolder file {path} cannot be read as an image ({reason}); remove it "
                                      f"or replace it with a readable image") from None


@register_dataset("fake", "torchvision FakeData (random images; benchmarks and tests)")
def fake(root=None, seed: int = 0, size: int = 512, num_classes: int = 10, image_size: int = 32,
         augment: bool = False):
    """``augment``: CIFAR's training transform (pad-4 random crop + flip + normalise) on the training split, so
    benchmarks on fake data pay CIFAR's data path (``bench/crd_protocol.py``)."""
    from torchvision import datasets, transforms

    shape = (3, image_size, image_size)
    norm = [transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN["cifar100"], CIFAR_STD["cifar100"])]
    crop = [transforms.RandomCrop(image_size, padding=4), transforms.RandomHorizontalFlip()] if augment else []

    def make(n, offset, steps):
        return datasets.FakeData(n, shape, num_classes, transform=transforms.Compose(steps), random_offset=offset)

    plain = norm if augment else [transforms.ToTensor()]
    fp = _fingerprint("fake", seed, size, num_classes, image_size, *(["augment"] if augment else []))
    return _splits(make(size, seed, crop + plain), make(max(size // 4, 1), seed + 10_000, plain),
                   make(max(size // 4, 1), seed + 20_000, plain),
                   num_classes, shape, fp)
