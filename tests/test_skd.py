"""SKD (Jeong et al., CVPR 2026): the instance KL and the Mahalanobis direction distance of the Gram matrices by
hand on fixed tensors, no CE unless asked, a finite gradient at a perfect match, shapes.

Gradient flow and the short digits training are checked for every registered method in test_every_method.py."""
from __future__ import annotations

import math

import pytest
import torch

from kdray.algorithms import create_method, get_method
from kdray.algorithms.base import Batch, ModelOutput


def batch(n):
    return Batch(torch.zeros(n, 1), torch.arange(n) % 3, torch.arange(n))


def out(x):
    return ModelOutput(x)


def direction_by_hand(s, t, lam):
    """The formula with plain loops for the Gram matrices and the covariance, and a general inverse."""
    b = s.shape[0]
    def gram(z):
        n = [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in z.tolist()]
        return [[sum(x * y for x, y in zip(n[i], n[j])) for j in range(b)] for i in range(b)]
    gs, gt = gram(s), gram(t)
    d = [[gs[i][j] - gt[i][j] for j in range(b)] for i in range(b)]
    mean = [sum(d[i][j] for i in range(b)) / b for j in range(b)]
    cov = [[sum((d[r][i] - mean[i]) * (d[r][j] - mean[j]) for r in range(b)) / (b - 1) + (lam if i == j else 0)
            for j in range(b)] for i in range(b)]
    inv = torch.linalg.inv(torch.tensor(cov, dtype=torch.float64)).tolist()
    dist = [math.sqrt(sum(d[r][i] * inv[i][j] * d[r][j] for i in range(b) for j in range(b))) for r in range(b)]
    return sum(dist) / b


def test_registered_with_torchdistills_values_and_no_ce():
    cls = get_method("skd")
    assert cls.kind == "response" and "Streamlined" in cls.paper and cls.provides_ce
    term = create_method("skd")
    assert (term.instance_weight, term.direction_weight, term.temperature, term.tikhonov, term.ce_weight) == \
        (1.0, 1.0, 4.0, 0.1, 0.0)


def test_both_terms_by_hand():
    torch.manual_seed(0)
    s, t = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    res = create_method("skd", instance_weight=0.5, direction_weight=2.0, temperature=2.0, tikhonov=0.3)(
        out(s), out(t), batch(4))
    assert set(res) == {"skd_instance", "skd_direction"}
    ps = [[math.exp(v / 2) / sum(math.exp(u / 2) for u in row) for v in row] for row in s.tolist()]
    pt = [[math.exp(v / 2) / sum(math.exp(u / 2) for u in row) for v in row] for row in t.tolist()]
    kl = sum(pt[i][k] * math.log(pt[i][k] / ps[i][k]) for i in range(4) for k in range(5)) / 4  # no T^2
    assert res["skd_instance"].item() == pytest.approx(0.5 * kl, rel=1e-9)
    assert res["skd_direction"].item() == pytest.approx(2.0 * direction_by_hand(s, t, 0.3), rel=1e-7)


def test_direction_ignores_logit_scale_and_is_zero_with_a_finite_gradient_at_a_match():
    torch.manual_seed(1)
    t = torch.randn(5, 4, dtype=torch.float64)
    s = (3.0 * t).requires_grad_()  # same directions: same Gram matrix
    res = create_method("skd")(out(s), out(t), batch(5))
    assert res["skd_direction"].item() == pytest.approx(0.0, abs=1e-5)
    res["skd_direction"].backward()
    assert torch.isfinite(s.grad).all()


def test_ce_only_when_asked():
    torch.manual_seed(2)
    s, t = torch.randn(3, 3), torch.randn(3, 3)
    res = create_method("skd", ce_weight=0.5)(out(s), out(t), batch(3))
    assert res["ce"].item() == pytest.approx(0.5 * torch.nn.functional.cross_entropy(s, torch.arange(3)).item())


def test_bad_input_is_one_line():
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(3, 5\)"):
        create_method("skd")(out(torch.randn(3, 4)), out(torch.randn(3, 5)), batch(3))
    with pytest.raises(ValueError, match="batch of >= 2"):
        create_method("skd")(out(torch.randn(1, 4)), out(torch.randn(1, 4)), batch(1))
    with pytest.raises(ValueError, match="tikhonov"):
        create_method("skd", tikhonov=0.0)
