"""PKD (Cao et al., NeurIPS 2022): per-channel standardisation and MSE/2 by hand (= (n-1)/n (1 - Pearson)),
invariance to per-channel affine maps, the connector when channels differ, bad shapes refused.

Gradient flow and the short digits training are checked for every registered method in test_every_method.py."""
from __future__ import annotations

import math

import pytest
import torch

from kdray.algorithms import create_method, get_method
from tests.test_feature_methods import batch_of, make_term, pin_identity, run

pytestmark = pytest.mark.usefixtures("one_thread")


def standardised(values):
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return [(v - mean) / (std + 1e-6) for v in values]


def channel_values(x, c):
    b, _, h, w = x.shape
    return [x[i, c, p, q].item() for i in range(b) for p in range(h) for q in range(w)]


def by_hand(s, t):
    """mean over all elements of (s_hat - t_hat)^2, halved, with the standardisation written out per channel."""
    total, count = 0.0, 0
    for c in range(s.shape[1]):
        a, b = standardised(channel_values(s, c)), standardised(channel_values(t, c))
        total += sum((x - y) ** 2 for x, y in zip(a, b))
        count += len(a)
    return total / count / 2


def test_registered_with_mmrazor_weight():
    cls = get_method("pkd")
    assert cls.kind == "feature" and "Pearson" in cls.paper
    assert create_method("pkd").weight == 6.0


def test_value_by_hand_two_pairs_and_the_pearson_identity():
    torch.manual_seed(0)
    s0, t0 = torch.randn(2, 2, 2, 2, dtype=torch.float64), torch.randn(2, 2, 2, 2, dtype=torch.float64)
    s1, t1 = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    term, s_out, t_out = make_term("pkd", [s0, s1], [t0, t1], weight=3.0)
    assert all(isinstance(c, torch.nn.Identity) for c in term.connectors)
    s_out.logits, t_out.logits = s_out.logits.double(), t_out.logits.double()
    out = run(term, s_out, t_out)
    expected = by_hand(s0, t0) + by_hand(s1[:, :, None, None], t1[:, :, None, None])
    assert out["pkd"].item() == pytest.approx(3.0 * expected, rel=1e-9)
    # one channel of n values: mse/2 of standardised vectors = (n - 1)/n * (1 - r) (up to the 1e-6)
    a, b = channel_values(s0, 0), channel_values(t0, 0)
    ma, mb = sum(a) / 8, sum(b) / 8
    r = sum((x - ma) * (y - mb) for x, y in zip(a, b)) / math.sqrt(
        sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))
    one = sum((x - y) ** 2 for x, y in zip(standardised(a), standardised(b))) / 8 / 2
    assert one == pytest.approx(7 / 8 * (1 - r), rel=1e-5)


def test_zero_for_a_per_channel_affine_image_of_the_teacher():
    torch.manual_seed(1)
    t = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    s = t * torch.tensor([2.0, 0.5, 7.0], dtype=torch.float64)[None, :, None, None] + 3.0
    term, s_out, t_out = make_term("pkd", [s], [t])
    assert run(term, s_out, t_out)["pkd"].item() < 1e-9


def test_connector_maps_student_channels_to_the_teachers():
    torch.manual_seed(2)
    s, t = torch.randn(2, 3, 2, 2), torch.randn(2, 2, 2, 2)
    term, s_out, t_out = make_term("pkd", [s], [t], weight=1.0)
    conv = term.connectors[0]
    assert isinstance(conv, torch.nn.Conv2d) and tuple(conv.weight.shape) == (2, 3, 1, 1)
    pin_identity(term.connectors)  # keeps the student's first two channels
    assert run(term, s_out, t_out)["pkd"].item() == pytest.approx(by_hand(s[:, :2].double(), t.double()), rel=1e-5)


def test_bad_shapes_are_refused_naming_both():
    with pytest.raises(ValueError, match="weight"):
        create_method("pkd", weight=-1.0)
    with pytest.raises(ValueError) as err:
        make_term("pkd", [torch.randn(2, 3, 2, 2)], [torch.randn(3, 3, 2, 2)])
    assert "(2, 3, 2, 2)" in str(err.value) and "(3, 3, 2, 2)" in str(err.value)
    term, s_out, t_out = make_term("pkd", [torch.randn(1, 3)], [torch.randn(1, 3)])
    with pytest.raises(ValueError, match=r"\(1, 3\).*\(1, 3\).*>= 2 values"):
        term(s_out, t_out, batch_of(1))
