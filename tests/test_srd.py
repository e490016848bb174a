"""SRD (Miles & Mikolajczyk, AAAI 2024, torchdistill's SRDLoss): projector, batch-normalised features, the
log-sum distance and the logit KL by hand; the projector gets gradients; bad shapes refused.

Gradient flow and the short digits training are checked for every registered method in test_every_method.py."""
from __future__ import annotations

import math

import pytest
import torch

from kdray.algorithms import create_method, get_method
from tests.test_feature_methods import batch_of, make_term

pytestmark = pytest.mark.usefixtures("one_thread")


def bn(column):
    """One feature over the batch: zero mean, unit biased variance, eps 1e-4."""
    n = len(column)
    mean = sum(column) / n
    var = sum((v - mean) ** 2 for v in column) / n
    return [(v - mean) / math.sqrt(var + 1e-4) for v in column]


def columns(rows):
    return [list(c) for c in zip(*rows)]


def softmax(row, tau):
    e = [math.exp(v / tau) for v in row]
    return [v / sum(e) for v in e]


def test_registered_with_the_official_config_settings():
    cls = get_method("srd")
    assert cls.kind == "feature" and "Role of the Projector" in cls.paper
    assert get_method("srrl") is not cls  # Yang et al.'s SRRL is another method
    term = create_method("srd")
    assert (term.feature_weight, term.kl_weight, term.exponent, term.temperature) == (2.0, 1.0, 4.0, 1.0)


def test_value_by_hand_with_a_fixed_projector():
    s = torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 0.5]], dtype=torch.float64)
    t = torch.tensor([[0.5, 1.0, -1.0], [2.0, 0.0, 1.0], [-1.0, 1.5, 0.0]], dtype=torch.float64)
    w = [[1.0, 0.0], [0.5, -1.0], [0.0, 2.0]]  # teacher width 3 from student width 2
    bias = [0.1, -0.2, 0.3]
    term, s_out, t_out = make_term("srd", [s], [t], feature_weight=1.5, kl_weight=0.5, exponent=3.0,
                                   temperature=2.0)
    assert tuple(term.projector.weight.shape) == (3, 2)
    term.double()
    with torch.no_grad():
        term.projector.weight.copy_(torch.tensor(w))
        term.projector.bias.copy_(torch.tensor(bias))
    z_s = [[0.2, 1.0, -0.5], [1.5, 0.0, 0.3], [0.0, 0.1, 0.9]]
    z_t = [[1.0, 0.5, 0.0], [2.0, -1.0, 0.5], [0.3, 0.3, 1.2]]
    s_out.logits, t_out.logits = torch.tensor(z_s, dtype=torch.float64), torch.tensor(z_t, dtype=torch.float64)
    out = term(s_out, t_out, batch_of(3))
    projected = [[sum(w[k][d] * row[d] for d in range(2)) + bias[k] for k in range(3)] for row in s.tolist()]
    p_cols, t_cols = [bn(c) for c in columns(projected)], [bn(c) for c in columns(t.tolist())]
    total = sum(abs(a - b) ** 3 for pc, tc in zip(p_cols, t_cols) for a, b in zip(pc, tc))
    kl = sum(sum(pt * math.log(pt / ps) for pt, ps in zip(softmax(zt, 2.0), softmax(zs, 2.0)))
             for zs, zt in zip(z_s, z_t)) / 3
    assert set(out) == {"srd_feature", "srd_kl"}
    assert out["srd_feature"].item() == pytest.approx(1.5 * math.log(total), rel=1e-9)
    assert out["srd_kl"].item() == pytest.approx(0.5 * kl, rel=1e-9)


def test_maps_are_pooled_and_the_teacher_side_is_batch_normalised():
    torch.manual_seed(0)
    t = torch.randn(4, 3, 2, 2)
    term, s_out, t_out = make_term("srd", [torch.randn(4, 3, 2, 2)], [t])
    # a student whose projected feature is an affine image (per channel) of the teacher's pooled feature
    with torch.no_grad():
        term.projector.weight.copy_(torch.eye(3))
        term.projector.bias.zero_()
    s_out.features["s0"] = 5.0 * t + 2.0
    out = term(s_out, t_out, batch_of(4))
    # BN removes scale and shift (up to eps = 1e-4 against a variance of ~25 vs ~1): the distance is ~0
    assert out["srd_feature"].item() < math.log(1e-6)


def test_projector_gets_gradients_and_bad_shapes_are_refused():
    torch.manual_seed(1)
    s = torch.randn(4, 2, requires_grad=True)
    term, s_out, t_out = make_term("srd", [s], [torch.randn(4, 3)])
    sum(term(s_out, t_out, batch_of(4)).values()).backward()
    assert term.projector.weight.grad.abs().sum() > 0 and s.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="feature_weight"):
        create_method("srd", feature_weight=-1.0)
    with pytest.raises(ValueError) as err:
        make_term("srd", [torch.randn(2, 3)], [torch.randn(4, 5)])
    assert "(2, 3)" in str(err.value) and "(4, 5)" in str(err.value)
    term, s_out, t_out = make_term("srd", [torch.randn(1, 3)], [torch.randn(1, 5)])
    with pytest.raises(ValueError, match=r"\(1, 3\).*\(1, 5\).*>= 2 samples"):
        term(s_out, t_out, batch_of(1))
    term, s_out, t_out = make_term("srd", [torch.randn(2, 3)], [torch.randn(2, 5)])
    s_out.features["s0"] = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 5\).*3 -> 5"):
        term(s_out, t_out, batch_of(2))
