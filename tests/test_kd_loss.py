"""Hinton KD against hand-computed values."""
import math

import pytest
import torch

from kdray.algorithms import create_method
from kdray.algorithms.base import Batch, ModelOutput


def _kd(student, teacher, targets, **params):
    term = create_method("kd", **params)
    batch = Batch(torch.zeros(len(targets), 1), torch.tensor(targets), torch.arange(len(targets)))
    return term(ModelOutput(torch.tensor(student)), ModelOutput(torch.tensor(teacher)), batch)


def test_kd_matches_hand_computed_value():
    # One sample, two classes, T=2: p_t = softmax([2, 0]/2) = softmax([1, 0]); p_s = softmax([0, 0]) = [.5, .5]
    e = math.e
    pt = [e / (e + 1), 1 / (e + 1)]
    kl = sum(p * math.log(p / 0.5) for p in pt)
    ce = math.log(2)  # student uniform, target 0
    out = _kd([[0.0, 0.0]], [[2.0, 0.0]], [0], alpha=0.25, temperature=2.0)
    assert out["kd"].item() == pytest.approx(0.25 * 4 * kl, rel=1e-6)
    assert out["ce"].item() == pytest.approx(0.75 * ce, rel=1e-6)


def test_kd_is_batchmean():
    one = _kd([[0.0, 1.0]], [[1.0, 0.0]], [0], alpha=1.0, temperature=1.0)["kd"]
    two = _kd([[0.0, 1.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]], [0, 0], alpha=1.0, temperature=1.0)["kd"]
    assert two.item() == pytest.approx(one.item(), rel=1e-6)


def test_zero_kl_when_student_equals_teacher():
    logits = torch.randn(8, 10).tolist()
    out = _kd(logits, logits, list(range(8)), alpha=0.9, temperature=4.0)
    assert out["kd"].item() == pytest.approx(0.0, abs=1e-6)


def test_t_squared_scaling_keeps_gradient_scale():
    # For large T, d(T^2 KL)/dz_s ~ (z_s - z_t)/N_classes / batch: independent of T (Hinton sec. 2.1).
    t = torch.tensor([[1.0, -1.0, 0.5]])
    grads = []
    for temperature in (10.0, 100.0):
        s = torch.zeros(1, 3, requires_grad=True)
        term = create_method("kd", alpha=1.0, temperature=temperature)
        loss = term(ModelOutput(s), ModelOutput(t), Batch(torch.zeros(1), torch.tensor([0]), torch.tensor([0])))["kd"]
        loss.backward()
        grads.append(s.grad.clone())
    expected = (torch.zeros(1, 3) - (t - t.mean())) / 3  # high-temperature limit
    for g in grads:
        assert torch.allclose(g, expected, atol=2e-2)
    assert torch.allclose(grads[0], grads[1], atol=2e-2)


def test_t_squared_factor_exact():
    s, t = [[0.3, -0.2, 0.1]], [[1.0, 0.0, -1.0]]
    base = _kd(s, t, [0], alpha=1.0, temperature=1.0)["kd"].item()
    logs = torch.log_softmax(torch.tensor(s) / 3, 1)
    logt = torch.log_softmax(torch.tensor(t) / 3, 1)
    kl3 = (logt.exp() * (logt - logs)).sum().item()
    assert _kd(s, t, [0], alpha=1.0, temperature=3.0)["kd"].item() == pytest.approx(9 * kl3, rel=1e-5)
    assert base > 0


def test_independent_ce_and_kd_weights():
    """RepDistiller's -r 1 -a 1: CE and KD both at weight 1 (not expressible in the convex form)."""
    s, t = [[0.3, -0.2, 0.1]], [[1.0, 0.0, -1.0]]
    convex = _kd(s, t, [2], alpha=0.5, temperature=4.0)
    free = _kd(s, t, [2], alpha=1.0, ce_weight=1.0, temperature=4.0)
    assert free["ce"].item() == pytest.approx(2 * convex["ce"].item(), rel=1e-6)
    assert free["kd"].item() == pytest.approx(2 * convex["kd"].item(), rel=1e-6)
    assert _kd(s, t, [2], alpha=2.5, ce_weight=0.0)["ce"].item() == 0.0


@pytest.mark.parametrize("params", [{"alpha": -0.1}, {"alpha": 1.5}, {"temperature": 0.0}, {"temperature": -1},
                                    {"alpha": 1.0, "ce_weight": -1.0}, {"alpha": -1.0, "ce_weight": 1.0}])
def test_bad_parameters_rejected(params):
    with pytest.raises(ValueError):
        create_method("kd", **params)
