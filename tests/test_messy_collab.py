"""Messy collaboration (Arani et al. 2019): KD with a seeded fraction of corrupted hard labels; values by hand,
the corruption's properties, shapes.

Gradient flow and the short digits training are checked for every registered method in test_every_method.py."""
from __future__ import annotations

import math

import pytest
import torch

from kdray.algorithms import create_method, get_method
from kdray.algorithms.base import Batch, ModelOutput

S = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
T = [[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]]


def _batch(targets):
    return Batch(torch.zeros(len(targets), 1), torch.tensor(targets), torch.arange(len(targets)))


def _out(x):
    return ModelOutput(torch.tensor(x, dtype=torch.float64))


def _softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def test_registered_with_kd_libs_defaults():
    cls = get_method("messy_collab")
    assert cls.kind == "response" and "Noisy Collaboration" in cls.paper and cls.provides_ce
    term = create_method("messy_collab")
    assert (term.alpha, term.temperature, term.noise_rate) == (0.5, 20.0, 0.02)


def test_without_noise_it_is_kd_by_hand():
    # T = 1: CE rows: -log softmax(S)[y]; KL(t || s) rows summed over classes, batch mean
    term = create_method("messy_collab", alpha=0.25, temperature=1.0, noise_rate=0.0)
    out = term(_out(S), _out(T), _batch([0, 2]))
    ps, pt = [_softmax(r) for r in S], [_softmax(r) for r in T]
    ce = (-math.log(ps[0][0]) - math.log(ps[1][2])) / 2
    kl = sum(pt[i][k] * math.log(pt[i][k] / ps[i][k]) for i in range(2) for k in range(3)) / 2
    assert out["ce"].item() == pytest.approx(0.75 * ce, rel=1e-9)
    assert out["messy_collab"].item() == pytest.approx(0.25 * kl, rel=1e-9)


def test_every_label_moves_to_another_class_at_rate_one_and_a_fraction_at_rate_half():
    targets = torch.arange(40) % 4
    moved = create_method("messy_collab", noise_rate=1.0, seed=3).corrupt(targets, 4)
    assert (moved != targets).all() and moved.min() >= 0 and moved.max() <= 3
    half = create_method("messy_collab", noise_rate=0.5, seed=3).corrupt(targets, 4)
    assert int((half != targets).sum()) == 20
    assert torch.equal(targets, torch.arange(40) % 4)  # the batch's own targets are not changed in place


def test_corruption_is_seeded_and_the_ce_sees_it():
    targets = [0, 2]
    a, b = (create_method("messy_collab", noise_rate=1.0, temperature=1.0, seed=s) for s in (1, 1))
    assert torch.equal(a.corrupt(torch.tensor(targets), 3), b.corrupt(torch.tensor(targets), 3))
    clean = create_method("messy_collab", noise_rate=0.0, temperature=1.0)(_out(S), _out(T), _batch(targets))
    noisy = create_method("messy_collab", noise_rate=1.0, temperature=1.0)(_out(S), _out(T), _batch(targets))
    assert noisy["ce"].item() != pytest.approx(clean["ce"].item())
    assert noisy["messy_collab"].item() == pytest.approx(clean["messy_collab"].item())  # soft targets stay clean


@pytest.mark.parametrize("bad", [{"alpha": 1.5}, {"temperature": 0.0}, {"noise_rate": -0.1}])
def test_bad_parameters_are_one_line(bad):
    with pytest.raises(ValueError, match="messy_collab") as err:
        create_method("messy_collab", **bad)
    assert "\n" not in str(err.value)


def test_bad_shapes_name_both():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        create_method("messy_collab")(_out(S), ModelOutput(torch.zeros(2, 4, dtype=torch.float64)), _batch([0, 1]))
