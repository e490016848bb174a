"""MLKD (Jin et al., CVPR 2023, without the augmentation part): instance / batch / class levels at several
temperatures by hand, the code's median-confidence factors, bad input.

Gradient flow and the short digits training are checked for every registered method in test_every_method.py."""
from __future__ import annotations

import math

import pytest
import torch

from kdray.algorithms import create_method, get_method
from kdray.algorithms.base import Batch, ModelOutput

S = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.5]]
T = [[3.0, 1.0, 0.0], [0.0, 1.5, -1.0], [0.5, 0.0, 2.5], [0.2, 0.1, 0.0]]
Y = [0, 1, 2, 0]


def softmax(row, tau=1.0):
    e = [math.exp(v / tau) for v in row]
    return [v / sum(e) for v in e]


def median(values):
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def test_registered_with_the_codes_defaults():
    cls = get_method("mlkd")
    assert cls.kind == "response" and "Multi-Level" in cls.paper and cls.provides_ce
    term = create_method("mlkd")
    assert (term.weight, term.ce_weight, term.temperatures) == (0.9, 0.1, (2.0, 3.0, 4.0, 5.0, 6.0))


def test_values_by_hand():
    taus = (2.0, 5.0)
    out = create_method("mlkd", weight=2.0, ce_weight=0.5, temperatures=taus)(
        ModelOutput(torch.tensor(S, dtype=torch.float64)), ModelOutput(torch.tensor(T, dtype=torch.float64)),
        Batch(torch.zeros(4, 1), torch.tensor(Y), torch.arange(4)))
    b, k = 4, 3
    conf = [max(softmax(t)) for t in T]
    class_conf = [sum(softmax(t)[c] for t in T) for c in range(k)]
    sample_share = sum(c <= median(conf) for c in conf) / b
    class_share = sum(c <= median(class_conf) for c in class_conf) / k
    assert sample_share == 0.5 and class_share == pytest.approx(2 / 3)
    inst = bat = cls = 0.0
    for tau in taus:
        ps, pt = [softmax(s, tau) for s in S], [softmax(t, tau) for t in T]
        inst += tau**2 * sum(sum(a * math.log(a / c) for a, c in zip(pt[i], ps[i])) for i in range(b)) / b
        bat += sum((sum(pt[i][c] * pt[j][c] for c in range(k)) - sum(ps[i][c] * ps[j][c] for c in range(k))) ** 2
                   for i in range(b) for j in range(b)) / b
        cls += sum((sum(pt[i][c] * pt[i][d] for i in range(b)) - sum(ps[i][c] * ps[i][d] for i in range(b))) ** 2
                   for c in range(k) for d in range(k)) / k
    ce = sum(-math.log(softmax(s)[y]) for s, y in zip(S, Y)) / b
    assert set(out) == {"ce", "mlkd_instance", "mlkd_batch", "mlkd_class"}
    assert out["ce"].item() == pytest.approx(0.5 * ce, rel=1e-9)
    assert out["mlkd_instance"].item() == pytest.approx(2.0 * sample_share * inst, rel=1e-9)
    assert out["mlkd_batch"].item() == pytest.approx(2.0 * sample_share * bat, rel=1e-9)
    assert out["mlkd_class"].item() == pytest.approx(2.0 * class_share * cls, rel=1e-9)


def test_zero_alignment_terms_for_a_student_equal_to_the_teacher():
    t = torch.randn(6, 5, dtype=torch.float64)
    out = create_method("mlkd")(ModelOutput(t.clone()), ModelOutput(t), Batch(torch.zeros(6, 1),
                                                                               torch.zeros(6, dtype=torch.long),
                                                                               torch.arange(6)))
    assert all(abs(out[k].item()) < 1e-12 for k in ("mlkd_instance", "mlkd_batch", "mlkd_class"))


def test_bad_parameters_and_shapes():
    with pytest.raises(ValueError, match="temperatures"):
        create_method("mlkd", temperatures=[])
    with pytest.raises(ValueError, match="temperatures"):
        create_method("mlkd", temperatures=[4.0, 0.0])
    with pytest.raises(ValueError, match="ce_weight"):
        create_method("mlkd", ce_weight=-0.1)
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 5\)"):
        create_method("mlkd")(ModelOutput(torch.zeros(2, 4)), ModelOutput(torch.zeros(2, 5)),
                              Batch(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), torch.arange(2)))
