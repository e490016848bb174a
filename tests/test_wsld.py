"""WSLD (Zhou et al., ICLR 2021): the weighted soft-label loss by hand, detached weights, shapes.

Gradient flow and the short digits training are checked for every registered method in test_every_method.py."""
from __future__ import annotations

import math

import pytest
import torch

from kdray.algorithms import create_method, get_method
from kdray.algorithms.base import Batch, ModelOutput

# softmax(log p) = p: at temperature 1 these logits give exactly these probabilities
P_T = [[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]]
P_S = [[0.4, 0.4, 0.2], [0.1, 0.8, 0.1]]
Y = [0, 1]


def _batch(targets):
    return Batch(torch.zeros(len(targets), 1), torch.tensor(targets), torch.arange(len(targets)))


def _out(p, requires_grad=False):
    return ModelOutput(torch.tensor(p, dtype=torch.float64).log().requires_grad_(requires_grad))


def test_registered_with_paper_defaults():
    cls = get_method("wsld")
    assert cls.kind == "response" and "Soft Labels" in cls.paper and not cls.provides_ce
    term = create_method("wsld")
    assert (term.alpha, term.temperature) == (2.25, 2.0)


def test_value_by_hand_at_temperature_one():
    # sample 0 (y = 0): CE_s = -log 0.4, CE_t = -log 0.7 -> w0 = 1 - exp(-log 0.4 / log 0.7)
    #   soft CE = -(0.7 log 0.4 + 0.2 log 0.4 + 0.1 log 0.2)
    # sample 1 (y = 1): CE_s = -log 0.8, CE_t = -log 0.5 -> w1 = 1 - exp(-log 0.8 / log 0.5) (student ahead: small)
    #   soft CE = -(0.2 log 0.1 + 0.5 log 0.8 + 0.3 log 0.1)
    w0 = 1 - math.exp(-math.log(0.4) / math.log(0.7))
    w1 = 1 - math.exp(-math.log(0.8) / math.log(0.5))
    h0 = -(0.9 * math.log(0.4) + 0.1 * math.log(0.2))
    h1 = -(0.5 * math.log(0.1) + 0.5 * math.log(0.8))
    assert w1 < 0.3 < 0.9 < w0  # the regularization sample is down-weighted
    out = create_method("wsld", alpha=3.0, temperature=1.0)(_out(P_S), _out(P_T), _batch(Y))
    assert set(out) == {"wsld"}
    assert out["wsld"].item() == pytest.approx(3.0 * (w0 * h0 + w1 * h1) / 2, rel=1e-9)


def test_weights_are_detached_and_temperature_only_softens_the_soft_term():
    # the gradient is T^2 * w_i * (p_s^T - p_t^T) / T / B with w_i computed at T = 1 and held constant
    tau = 2.0
    s, t = _out(P_S, requires_grad=True), _out(P_T)
    create_method("wsld", alpha=1.0, temperature=tau)(s, t, _batch(Y))["wsld"].backward()
    ls, lt = s.logits.detach(), t.logits
    w = 1 - torch.exp(-torch.nn.functional.cross_entropy(ls, torch.tensor(Y), reduction="none")
                      / torch.nn.functional.cross_entropy(lt, torch.tensor(Y), reduction="none"))
    expected = tau * w[:, None] * (torch.softmax(ls / tau, 1) - torch.softmax(lt / tau, 1)) / 2
    assert torch.allclose(s.logits.grad, expected, atol=1e-12)


def test_bad_parameters_and_shape_mismatch():
    with pytest.raises(ValueError, match="temperature"):
        create_method("wsld", temperature=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        create_method("wsld", alpha=-0.1)
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 5\)"):
        create_method("wsld")(ModelOutput(torch.zeros(2, 4)), ModelOutput(torch.zeros(2, 5)), _batch(Y))
