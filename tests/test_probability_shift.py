"""Probability shift (Wen et al. 2019): the swap on wrong teacher rows, the KD value by hand, shapes.

Gradient flow and the short digits training are checked for every registered method in test_every_method.py."""
from __future__ import annotations

import math

import pytest
import torch

from kdray.algorithms import create_method, get_method
from kdray.algorithms.base import Batch, ModelOutput
from kdray.algorithms.response.probability_shift import shift_to_target

# teacher probabilities (softmax(log p) = p): row 0 right (target 0), row 1 wrong (predicts 2, target 1)
P_T = [[0.6, 0.3, 0.1], [0.2, 0.3, 0.5]]
P_S = [[0.5, 0.25, 0.25], [0.2, 0.6, 0.2]]
Y = [0, 1]


def _batch(targets):
    return Batch(torch.zeros(len(targets), 1), torch.tensor(targets), torch.arange(len(targets)))


def _logits(p):
    return torch.tensor(p, dtype=torch.float64).log()


def test_registered_with_kd_defaults():
    cls = get_method("probability_shift")
    assert cls.kind == "response" and "Preparing Lessons" in cls.paper and cls.provides_ce
    term = create_method("probability_shift")
    assert (term.alpha, term.temperature) == (0.9, 4.0)


def test_swap_only_on_wrong_rows_at_any_temperature():
    t = _logits(P_T)
    shifted = shift_to_target(t, torch.tensor(Y))
    assert torch.equal(shifted[0], t[0])  # right: untouched
    assert torch.allclose(shifted[1].exp(), torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64))  # 0.3 <-> 0.5
    for tau in (1.0, 4.0):  # the same swap of the softened probabilities
        p = torch.softmax(t / tau, 1)
        assert torch.allclose(torch.softmax(shifted / tau, 1)[1], p[1][[0, 2, 1]])
    assert (shifted.argmax(1) == torch.tensor(Y)).all()


def test_value_by_hand_at_temperature_one():
    # adjusted teacher: row 0 (0.6, 0.3, 0.1), row 1 (0.2, 0.5, 0.3)
    kl0 = 0.6 * math.log(0.6 / 0.5) + 0.3 * math.log(0.3 / 0.25) + 0.1 * math.log(0.1 / 0.25)
    kl1 = 0.2 * math.log(0.2 / 0.2) + 0.5 * math.log(0.5 / 0.6) + 0.3 * math.log(0.3 / 0.2)
    ce = -(math.log(0.5) + math.log(0.6)) / 2
    out = create_method("probability_shift", alpha=0.7, temperature=1.0)(
        ModelOutput(_logits(P_S)), ModelOutput(_logits(P_T)), _batch(Y))
    assert set(out) == {"ce", "probability_shift"}
    assert out["probability_shift"].item() == pytest.approx(0.7 * (kl0 + kl1) / 2, rel=1e-9)
    assert out["ce"].item() == pytest.approx(0.3 * ce, rel=1e-9)


def test_equals_kd_when_the_teacher_is_right():
    torch.manual_seed(0)
    t = torch.randn(6, 5, dtype=torch.float64)
    y = t.argmax(1)
    s = torch.randn(6, 5, dtype=torch.float64)
    ps = create_method("probability_shift")(ModelOutput(s), ModelOutput(t), _batch(y.tolist()))
    kd = create_method("kd")(ModelOutput(s), ModelOutput(t), _batch(y.tolist()))
    assert ps["probability_shift"].item() == pytest.approx(kd["kd"].item(), rel=1e-12)
    assert ps["ce"].item() == pytest.approx(kd["ce"].item(), rel=1e-12)


def test_bad_parameters_and_shapes():
    with pytest.raises(ValueError, match="alpha"):
        create_method("probability_shift", alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        create_method("probability_shift", temperature=0.0)
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 5\)"):
        create_method("probability_shift")(ModelOutput(torch.zeros(2, 4)), ModelOutput(torch.zeros(2, 5)), _batch(Y))
