"""Label smoothing (Szegedy et al., CVPR 2016) as a term: the value by hand, torch's label_smoothing, the point
where it meets tfkd, shapes.

Gradient flow and the short digits training are checked for every registered method in test_every_method.py."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdray.algorithms import create_method, get_method
from kdray.algorithms.base import Batch, ModelOutput

P_S = [[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]]  # softmax(log p) = p
Y = [0, 2]


def _batch(targets):
    return Batch(torch.zeros(len(targets), 1), torch.tensor(targets), torch.arange(len(targets)))


def test_registered_teacher_free_with_paper_default():
    cls = get_method("label_smoothing")
    assert cls.kind == "response" and "Inception" in cls.paper and cls.provides_ce
    assert create_method("label_smoothing").epsilon == 0.1


def test_value_by_hand():
    # CE = -(log 0.5 + log 0.6) / 2; H(u, p) = -(1/3) [ (log .5 + 2 log .25) + (2 log .2 + log .6) ] / 2
    ce = -(math.log(0.5) + math.log(0.6)) / 2
    uni = -((math.log(0.5) + 2 * math.log(0.25)) + (2 * math.log(0.2) + math.log(0.6))) / 3 / 2
    logits = torch.tensor(P_S, dtype=torch.float64).log()
    out = create_method("label_smoothing", epsilon=0.2)(ModelOutput(logits), ModelOutput(logits), _batch(Y))
    assert set(out) == {"ce", "label_smoothing"}
    assert out["ce"].item() == pytest.approx(0.8 * ce, rel=1e-12)
    assert out["label_smoothing"].item() == pytest.approx(0.2 * uni, rel=1e-12)
    total = sum(out.values()).item()
    assert total == pytest.approx(F.cross_entropy(logits, torch.tensor(Y), label_smoothing=0.2).item(), rel=1e-12)


def test_meets_tfkd_at_temperature_one_up_to_the_target_entropy():
    torch.manual_seed(0)
    k, eps = 5, 0.1
    logits = torch.randn(4, k, dtype=torch.float64)
    batch = _batch([0, 3, 1, 4])
    ls = sum(create_method("label_smoothing", epsilon=eps)(ModelOutput(logits), ModelOutput(logits), batch).values())
    a = 1 - eps + eps / k
    tf = sum(create_method("tfkd", alpha=1.0, temperature=1.0, correct_prob=a)(
        ModelOutput(logits), ModelOutput(logits), batch).values())
    entropy = -(a * math.log(a) + (k - 1) * (eps / k) * math.log(eps / k))
    assert ls.item() == pytest.approx(tf.item() + entropy, rel=1e-6)  # tfkd builds log p^d in float32


def test_bad_epsilon_and_shapes():
    with pytest.raises(ValueError, match="epsilon"):
        create_method("label_smoothing", epsilon=1.0)
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(3,\)"):
        create_method("label_smoothing")(ModelOutput(torch.zeros(2, 4)), ModelOutput(torch.zeros(2, 4)),
                                         _batch([0, 1, 2]))
