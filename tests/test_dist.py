"""DIST (Huang et al., NeurIPS 2022): inter- / intra-class Pearson distances by hand, tau^2, shapes.

Gradient flow and the short digits training are checked for every registered method in test_every_method.py."""
from __future__ import annotations

import math

import pytest
import torch

from kdray.algorithms import create_method, get_method
from kdray.algorithms.base import Batch, ModelOutput

# softmax(log p) = p, so these are the probabilities at tau = 1
P_T = [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]
P_S = [[0.2, 0.3, 0.5], [0.3, 0.4, 0.3]]


def _batch(n):
    return Batch(torch.zeros(n, 1), torch.zeros(n, dtype=torch.long), torch.arange(n))


def _logits(p, tau=1.0):
    return ModelOutput(tau * torch.tensor(p, dtype=torch.float64).log())


def test_registered_with_cifar_defaults():
    cls = get_method("dist")
    assert cls.kind == "response" and "Stronger Teacher" in cls.paper and not cls.provides_ce
    term = create_method("dist")
    assert (term.beta, term.gamma, term.temperature) == (2.0, 2.0, 4.0)


def test_values_by_hand():
    # inter, row 0: centred t = (5, -1, -4)/30, s = (-4, -1, 5)/30 -> rho = -39/42 = -13/14
    #        row 1: centred t = (-7, 8, -1)/30, s = (-1, 2, -1)/30 -> rho = 24 / sqrt(114 * 6) = 4 / sqrt(19)
    inter = 1 - (-13 / 14 + 4 / math.sqrt(19)) / 2
    # intra, B = 2: each column's correlation is the sign agreement of the two changes:
    #   class 0: t down, s up -> -1; class 1: both up -> +1; class 2: t up, s down -> -1
    intra = 1 - (-1 + 1 - 1) / 3
    out = create_method("dist", beta=3.0, gamma=0.5, temperature=1.0)(_logits(P_S), _logits(P_T), _batch(2))
    assert set(out) == {"dist_inter", "dist_intra"}
    assert out["dist_inter"].item() == pytest.approx(3.0 * inter, rel=1e-9)
    assert out["dist_intra"].item() == pytest.approx(0.5 * intra, rel=1e-9)


def test_temperature_squared_factor_as_in_the_official_code():
    # logits tau * log p give the same softened probabilities at temperature tau: only tau^2 changes
    one = create_method("dist", temperature=1.0)(_logits(P_S), _logits(P_T), _batch(2))
    four = create_method("dist", temperature=4.0)(_logits(P_S, 4.0), _logits(P_T, 4.0), _batch(2))
    for key in one:
        assert four[key].item() == pytest.approx(16 * one[key].item(), rel=1e-9)


def test_zero_when_predictions_match_and_invariant_to_affine_probabilities():
    torch.manual_seed(0)
    t = torch.randn(6, 5, dtype=torch.float64)
    term = create_method("dist")
    same = term(ModelOutput(t.clone()), ModelOutput(t), _batch(6))
    assert all(abs(v.item()) < 1e-9 for v in same.values())
    # a student whose softened probabilities are a positive affine map of the teacher's has rho = 1 in every
    # row, so the inter-class distance is 0 although KL would not be
    p_t = torch.softmax(t / 4.0, dim=1)
    p_s = 0.5 * p_t + 0.5 / 5
    out = term(ModelOutput(4.0 * p_s.log()), ModelOutput(t), _batch(6))
    assert abs(out["dist_inter"].item()) < 1e-9


def test_bad_parameters_and_shape_mismatch():
    with pytest.raises(ValueError, match="temperature"):
        create_method("dist", temperature=0.0)
    with pytest.raises(ValueError, match="beta"):
        create_method("dist", beta=-1.0)
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 5\)"):
        create_method("dist")(ModelOutput(torch.zeros(2, 4)), ModelOutput(torch.zeros(2, 5)), _batch(2))

