"""Shared checks for knowledge terms: gradient flow and a short training on digits.

Teacher ``digits_cnn`` (width 16) and student ``digits_cnn`` (width 8) both have two spatial stages
(8x8 -> 4x4 and 4x4 -> 2x2), so every feature and relation method has maps to match, with
different channel counts so connectors are exercised.
"""
from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader

from kdray.algorithms import create_method, get_method
from kdray.algorithms.base import Batch
from kdray.algorithms.distiller import Distiller, Teacher
from kdray.algorithms.engine import TrainLoop, seed_everything
from kdray.algorithms.optim import make_optimizer, make_schedule
from kdray.data import ClassPairBatchSampler, build_datasets
from kdray.data.two_views import split_targets
from kdray.models import create_model


def train_batches(method: str, split, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A digits loader for ``method``: class-pair batches (``batch_size`` anchors + partners) for a term that
    reads them (CS-KD), else plain batches."""
    if get_method(method).needs_class_pairs:
        return DataLoader(split, batch_sampler=ClassPairBatchSampler(split_targets(split), batch_size // 2, seed))
    if shuffle:
        return DataLoader(split, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    return DataLoader(split, batch_size=batch_size, shuffle=False)


def make_pair(method: str, student_width: int = 8, teacher_width: int = 16, dtype: torch.dtype = torch.float32,
              **params):
    """(distiller, teacher, example batch) with connectors built from a digits batch; with ``dtype`` (e.g.
    ``torch.float64``) the models and the inputs are in that dtype before the connectors are built. The same
    arguments give the same weights (seeded), so two calls make two identical, independent pairs."""
    seed_everything(0)
    splits = build_datasets("digits", train_fraction=0.2)
    student = create_model("digits_cnn", 10, width=student_width).to(dtype)
    teacher_model = create_model("digits_cnn", 10, width=teacher_width).to(dtype)
    distiller = Distiller(student, [create_method(method, **params)])
    teacher = Teacher(teacher_model, distiller.resolve_teacher_points(teacher_model))
    loader = train_batches(method, splits.train, 16, shuffle=False)
    x, y, idx = next(iter(loader))
    x = x.to(dtype)
    distiller.build(x, teacher, len(splits.train))
    return distiller, teacher, Batch(x, y, idx)


def assert_gradients_reach_student_and_connectors(method: str, **params):
    """Backward through the term only (the distiller's step without its "ce"): student and connector params get
    gradients, the teacher none. Through the distiller, so a term with extra inputs (SSKD) gets their outputs."""
    distiller, teacher, batch = make_pair(method, **params)
    distiller.train()
    term = distiller.terms[0]
    _logits, losses = distiller(batch, teacher(batch.inputs))
    total = sum(v for k, v in losses.items() if k != "ce")
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.student.parameters()), \
        "no gradient reached the student"
    for p in term.parameters():
        if p.requires_grad:
            assert p.grad is not None, "a connector parameter got no gradient"
    assert all(p.grad is None for p in teacher.parameters()), "a gradient reached the teacher"


def short_training(method: str, epochs: int = 4, **params) -> list[float]:
    """Train a pretrained-for-2-epochs teacher's student with ``method``; return per-epoch train loss."""
    seed_everything(0)
    splits = build_datasets("digits", train_fraction=0.2)
    loader = DataLoader(splits.train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(splits.val, batch_size=256)
    teacher_model = create_model("digits_cnn", 10, width=16)
    pre = Distiller(teacher_model)
    opt = make_optimizer(pre.parameters(), "sgd", 0.05)
    TrainLoop(pre, None, opt, make_schedule(opt, "constant", 3), loader, val, 10, 3, "cpu").run()
    if get_method(method).needs_class_pairs:  # CS-KD: 16 anchors + their partners per batch
        loader = train_batches(method, splits.train, 32, shuffle=True)
    student = create_model("digits_cnn", 10, width=8)
    distiller = Distiller(student, [create_method(method, **params)])
    teacher = Teacher(teacher_model, distiller.resolve_teacher_points(teacher_model))
    x = next(iter(loader))[0]
    distiller.build(x, teacher, len(splits.train))
    opt = make_optimizer(distiller.parameters(), "sgd", 0.02)
    loop = TrainLoop(distiller, teacher, opt, make_schedule(opt, "constant", epochs), loader, val, 10, epochs, "cpu")
    losses = [h["train_loss"] for h in loop.run()]
    assert all(math.isfinite(v) for v in losses), losses
    return losses
