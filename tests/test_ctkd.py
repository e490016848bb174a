"""CTKD (Li et al., AAAI 2023): KD at the learned, bounded temperature by hand, the reversed and
cosine-scheduled gradient on the temperature, the curriculum values, bad input.

Gradient flow and the short digits training are checked for every registered method in test_every_method.py."""
from __future__ import annotations

import math

import pytest
import torch

from kdray.algorithms import create_method, get_method
from kdray.algorithms.base import Batch, ModelOutput

S = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]]
T = [[2.0, 1.0, 0.0], [0.0, 3.0, -1.0]]
Y = [0, 1]


def _batch():
    return Batch(torch.zeros(2, 1), torch.tensor(Y), torch.arange(2))


def _softmax(row, tau):
    e = [math.exp(v / tau) for v in row]
    return [v / sum(e) for v in e]


def test_registered_with_the_official_defaults():
    cls = get_method("ctkd")
    assert cls.kind == "response" and "Curriculum Temperature" in cls.paper and cls.provides_ce
    term = create_method("ctkd")
    assert (term.alpha, term.min_temperature, term.temperature_span, term.lambda_epochs) == (0.9, 1.0, 20.0, 10)
    assert term.temperature == pytest.approx(1 + 20 / (1 + math.exp(-1)))  # theta starts at 1: tau ~ 15.62


def test_value_by_hand_at_the_learned_temperature():
    term = create_method("ctkd", alpha=0.75, initial_theta=0.0)  # sigmoid(0) = 1/2: tau = 1 + 10 = 11
    tau = 11.0
    assert term.temperature == pytest.approx(tau)
    out = term(ModelOutput(torch.tensor(S, dtype=torch.float64)), ModelOutput(torch.tensor(T, dtype=torch.float64)),
               _batch())
    kl = 0.0
    ce = 0.0
    for s, t, y in zip(S, T, Y):
        p_s, p_t = _softmax(s, tau), _softmax(t, tau)
        kl += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s)) / 2
        ce += -math.log(_softmax(s, 1.0)[y]) / 2
    assert set(out) == {"ce", "ctkd"}
    assert out["ctkd"].item() == pytest.approx(0.75 * tau**2 * kl, rel=1e-9)
    assert out["ce"].item() == pytest.approx(0.25 * ce, rel=1e-9)


def test_curriculum_lambda_cosine_from_0_to_1_as_the_code_counts_epochs():
    term = create_method("ctkd")
    expected = {0: (1 - math.cos(math.pi / 10)) / 2, 4: 0.5, 9: 1.0, 50: 1.0}
    for epoch, lam in expected.items():
        term.set_epoch(epoch)
        assert term.reversal == pytest.approx(lam, abs=1e-12)
    term = create_method("ctkd", lambda_max=0.5, lambda_epochs=4)
    term.set_epoch(1)  # code epoch 2 of 4: half way
    assert term.reversal == pytest.approx(0.25)


@pytest.mark.parametrize("epoch", [0, 4, 20])
def test_temperature_ascends_the_loss_the_student_descends(epoch):
    s = torch.tensor(S, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(T, dtype=torch.float64)
    term = create_method("ctkd").double()
    term.set_epoch(epoch)
    out = term(ModelOutput(s), ModelOutput(t), _batch())
    out["ctkd"].backward()
    # the same loss with the temperature as a plain function of theta: its true gradient
    theta = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    tau = (1 + 20 * torch.sigmoid(theta)).reshape(())
    log_p_s = torch.log_softmax(s.detach() / tau, dim=1)
    p_t = torch.softmax(t.detach() / tau, dim=1)
    plain = 0.9 * tau**2 * (p_t * (p_t.log() - log_p_s)).sum(dim=1).mean()
    (true_grad,) = torch.autograd.grad(plain, theta)
    lam = term.reversal
    assert lam > 0 and true_grad.abs().item() > 1e-6
    assert term.theta.grad.item() == pytest.approx(-lam * true_grad.item(), rel=1e-9)
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_bad_parameters_and_shape_mismatch():
    with pytest.raises(ValueError, match="alpha"):
        create_method("ctkd", alpha=1.5)
    with pytest.raises(ValueError, match="temperature_span"):
        create_method("ctkd", temperature_span=0.0)
    with pytest.raises(ValueError, match="lambda_epochs"):
        create_method("ctkd", lambda_epochs=0)
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 5\)"):
        create_method("ctkd")(ModelOutput(torch.zeros(2, 4)), ModelOutput(torch.zeros(2, 5)), _batch())
