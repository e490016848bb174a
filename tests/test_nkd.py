"""NKD (Yang et al., ICCV 2023): the target term and the normalised non-target term by hand, the teacher's
target probability as a constant, bad shapes refused.

Gradient flow and the short digits training are checked for every registered method in test_every_method.py."""
from __future__ import annotations

import math

import pytest
import torch

from kdray.algorithms import create_method, get_method
from kdray.algorithms.base import Batch, ModelOutput

S = [[1.0, 0.0, -1.0, 0.5], [0.5, 2.0, 0.0, -0.5]]
T = [[2.0, 1.0, 0.0, 1.0], [0.0, 3.0, -1.0, 0.5]]
Y = [0, 2]


def _batch(y=Y):
    return Batch(torch.zeros(len(y), 1), torch.tensor(y), torch.arange(len(y)))


def _softmax(row, tau=1.0):
    e = [math.exp(v / tau) for v in row]
    return [v / sum(e) for v in e]


def test_registered_with_the_authors_cifar_defaults():
    cls = get_method("nkd")
    assert cls.kind == "response" and "Normalized Loss" in cls.paper and not cls.provides_ce
    term = create_method("nkd")
    assert (term.weight, term.gamma, term.temperature) == (1.0, 3.5, 3.0)


def test_values_by_hand():
    gamma, tau = 1.5, 2.0
    term = create_method("nkd", weight=2.0, gamma=gamma, temperature=tau)
    out = term(ModelOutput(torch.tensor(S, dtype=torch.float64)), ModelOutput(torch.tensor(T, dtype=torch.float64)),
               _batch())
    target = non_target = 0.0
    for s, t, y in zip(S, T, Y):
        target += -_softmax(t)[y] * math.log(_softmax(s)[y]) / 2
        s_rest = [v for i, v in enumerate(s) if i != y]  # the label's logit is dropped, then renormalised
        t_rest = [v for i, v in enumerate(t) if i != y]
        p_s, p_t = _softmax(s_rest, tau), _softmax(t_rest, tau)
        non_target += -gamma * tau**2 * sum(pt * math.log(ps) for pt, ps in zip(p_t, p_s)) / 2
    assert set(out) == {"nkd_target", "nkd_non_target"}
    assert out["nkd_target"].item() == pytest.approx(2.0 * target, rel=1e-9)
    assert out["nkd_non_target"].item() == pytest.approx(2.0 * non_target, rel=1e-9)


def test_non_target_term_ignores_the_target_logit_and_teacher_gets_no_gradient():
    s = torch.tensor(S, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(T, dtype=torch.float64, requires_grad=True)
    term = create_method("nkd")
    out = term(ModelOutput(s), ModelOutput(t), _batch())
    # raising the label's logits changes the target term only: the non-target distributions are renormalised
    bumped_s, bumped_t = s.detach().clone(), t.detach().clone()
    bumped_s[0, 0] += 3.0
    bumped_t[1, 2] -= 2.0
    again = term(ModelOutput(bumped_s), ModelOutput(bumped_t), _batch())
    assert again["nkd_non_target"].item() == pytest.approx(out["nkd_non_target"].item(), rel=1e-12)
    assert again["nkd_target"].item() != pytest.approx(out["nkd_target"].item())
    # T_t is a constant of the target term (detached in the authors' code)
    out["nkd_target"].backward()
    assert t.grad is None and s.grad.abs().sum() > 0


def test_bad_parameters_and_shapes():
    with pytest.raises(ValueError, match="temperature"):
        create_method("nkd", temperature=0.0)
    with pytest.raises(ValueError, match="gamma"):
        create_method("nkd", gamma=-1.0)
    term = create_method("nkd")
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 5\)"):
        term(ModelOutput(torch.zeros(2, 4)), ModelOutput(torch.zeros(2, 5)), _batch())
    with pytest.raises(ValueError, match=r"targets of shape \(3,\).*\(2, 4\)"):
        term(ModelOutput(torch.zeros(2, 4)), ModelOutput(torch.zeros(2, 4)), _batch([0, 1, 2]))
