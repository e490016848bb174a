"""Noisy teacher (Sau & Balasubramanian 2016): relative noise on a fraction of the batch from a seeded generator,
the L2 value by hand, shapes.

Gradient flow and the short digits training are checked for every registered method in test_every_method.py."""
from __future__ import annotations

import pytest
import torch

from kdray.algorithms import create_method, get_method
from kdray.algorithms.base import Batch, ModelOutput

S = [[2.0, 0.5, -1.0, 0.0], [0.3, 1.2, 0.1, -0.4]]
T = [[3.0, 1.0, -2.0, 0.5], [-0.5, 2.5, 0.0, 1.0]]


def _batch(n):
    return Batch(torch.zeros(n, 1), torch.zeros(n, dtype=torch.long), torch.arange(n))


def _loss(term, s, t):
    return term(ModelOutput(torch.tensor(s)), ModelOutput(torch.tensor(t)), _batch(len(s)))["noisy_teacher"].item()


def test_registered_with_defaults():
    cls = get_method("noisy_teacher")
    assert cls.kind == "response" and "Noisy Teachers" in cls.paper and not cls.provides_ce
    term = create_method("noisy_teacher")
    assert (term.weight, term.sigma, term.alpha, term.seed) == (1.0, 0.1, 0.5, 0)


def test_without_noise_it_is_logit_matching_by_hand():
    # diffs (-1, -0.5, 1, -0.5) and (0.8, -1.3, 0.1, -1.4): 1/B sum 1/2 ||d||^2 = (2.5 / 2 + 4.3 / 2) / 2 = 1.7
    assert _loss(create_method("noisy_teacher", sigma=0.0, weight=2.0), S, T) == pytest.approx(3.4, rel=1e-6)
    assert _loss(create_method("noisy_teacher", alpha=0.0), S, T) == pytest.approx(1.7, rel=1e-6)


def test_value_with_known_noise():
    # alpha = 1: every logit is scaled by 1 + xi; with the seed's own draws (randperm picks the rows, in that
    # order the rows take the randn draws)
    term = create_method("noisy_teacher", sigma=0.3, alpha=1.0, seed=7)
    g = torch.Generator().manual_seed(7)
    rows = torch.randperm(2, generator=g)
    xi = torch.zeros(2, 4, dtype=torch.float64)
    xi[rows] = 0.3 * torch.randn(2, 4, generator=g, dtype=torch.float64)
    noisy = torch.tensor(T, dtype=torch.float64) * (1 + xi)
    expected = 0.5 * ((torch.tensor(S, dtype=torch.float64) - noisy) ** 2).sum(1).mean().item()
    assert _loss(term, S, T) == pytest.approx(expected, rel=1e-6)


def test_fraction_relative_scale_and_reproducibility():
    t = torch.full((40, 50), 2.0)
    term = create_method("noisy_teacher", sigma=0.2, alpha=0.25, seed=3)
    noisy = term.perturb(t)
    changed = (noisy != t).any(dim=1)
    assert changed.sum().item() == 10  # round(0.25 * 40) rows, the others exactly clean
    rel = (noisy[changed] - 2.0) / 2.0  # xi itself: mean 0, std sigma
    assert abs(rel.mean().item()) < 0.03 and rel.std().item() == pytest.approx(0.2, rel=0.1)
    again = create_method("noisy_teacher", sigma=0.2, alpha=0.25, seed=3).perturb(t)
    assert torch.equal(noisy, again)  # same seed, same noise, whatever the global RNG
    assert not torch.equal(term.perturb(t), noisy)  # the generator advances between calls
    assert not torch.equal(create_method("noisy_teacher", sigma=0.2, alpha=0.25, seed=4).perturb(t), noisy)
    assert not noisy.requires_grad


def test_bad_parameters_and_shape_mismatch():
    for bad in ({"sigma": -0.1}, {"alpha": 1.5}, {"weight": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            create_method("noisy_teacher", **bad)
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 5\)"):
        create_method("noisy_teacher")(ModelOutput(torch.zeros(2, 4)), ModelOutput(torch.zeros(2, 5)), _batch(2))
