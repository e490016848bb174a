"""DIST+ (Huang et al., TPAMI 2025): the DIST relations plus the channel and spatial feature relations by hand on
fixed tensors, the connector, shape errors.

Gradient flow and the short digits training are checked for every registered method in test_every_method.py."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from kdray.algorithms import create_method, get_method
from kdray.algorithms.base import Batch, ModelOutput


def rho(u, v):
    """Pearson's correlation of two lists, by the textbook formula."""
    mu, mv = sum(u) / len(u), sum(v) / len(v)
    cov = sum((a - mu) * (b - mv) for a, b in zip(u, v))
    return cov / math.sqrt(sum((a - mu) ** 2 for a in u) * sum((b - mv) ** 2 for b in v))


def softmax(row, tau):
    e = [math.exp(x / tau) for x in row]
    return [x / sum(e) for x in e]


def make(s_map, t_map, s_logits, t_logits, **params):
    term = create_method("dist_plus", **params)
    term.student_points, term.teacher_points = ["s"], ["t"]
    s_out = ModelOutput(s_logits, {"s": s_map})
    t_out = ModelOutput(t_logits, {"t": t_map})
    with torch.no_grad():
        term.build(s_out, t_out, 100)
    return term, s_out, t_out


def batch(n):
    return Batch(torch.zeros(n, 1), torch.zeros(n, dtype=torch.long), torch.arange(n))


def test_registered_with_dists_cifar_defaults_and_torchdistills_feature_weights():
    cls = get_method("dist_plus")
    assert cls.kind == "feature" and "DIST+" in cls.paper and not cls.provides_ce
    term = create_method("dist_plus")
    assert (term.beta, term.gamma, term.iota, term.kappa, term.temperature) == (2.0, 2.0, 1.0, 1.0, 4.0)


def test_all_four_relations_by_hand():
    torch.manual_seed(0)
    s_map, t_map = torch.randn(3, 4, 2, 2, dtype=torch.float64), torch.randn(3, 4, 2, 2, dtype=torch.float64)
    s_log, t_log = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    term, s_out, t_out = make(s_map, t_map, s_log, t_log, beta=0.5, gamma=3.0, iota=2.0, kappa=0.25,
                              temperature=2.0)
    assert isinstance(term.connector, nn.Identity)
    out = term(s_out, t_out, batch(3))
    ys = [softmax(r, 2.0) for r in s_log.tolist()]
    yt = [softmax(r, 2.0) for r in t_log.tolist()]
    inter = 1 - sum(rho(ys[i], yt[i]) for i in range(3)) / 3
    intra = 1 - sum(rho([ys[i][k] for i in range(3)], [yt[i][k] for i in range(3)]) for k in range(5)) / 5
    vec = lambda m, b, h, w: [m[b, c, h, w].item() for c in range(4)]  # noqa: E731
    cells = [(b, h, w) for b in range(3) for h in range(2) for w in range(2)]
    channel = 1 - sum(rho(vec(s_map, *x), vec(t_map, *x)) for x in cells) / len(cells)
    agg = lambda m, b, h, w: sum(vec(m, b, h, w))  # noqa: E731
    spatial = 1 - sum(rho([agg(s_map, b, h, w) for b in range(3)], [agg(t_map, b, h, w) for b in range(3)])
                      for h in range(2) for w in range(2)) / 4
    assert out["dist_plus_inter"].item() == pytest.approx(0.5 * 4 * inter, rel=1e-9)
    assert out["dist_plus_intra"].item() == pytest.approx(3.0 * 4 * intra, rel=1e-9)
    assert out["dist_plus_channel"].item() == pytest.approx(2.0 * channel, rel=1e-9)
    assert out["dist_plus_spatial"].item() == pytest.approx(0.25 * spatial, rel=1e-9)


def test_feature_relations_vanish_for_an_affine_copy_and_the_connector_maps_channels():
    torch.manual_seed(1)
    t_map = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    logits = torch.randn(4, 5, dtype=torch.float64)
    term, s_out, t_out = make(2.0 * t_map + 1.0, t_map, logits, logits)
    out = term(s_out, t_out, batch(4))
    assert all(abs(v.item()) < 1e-9 for v in out.values())
    # a student of 2 channels goes through a 1x1 conv: pinned to the teacher's first two channels + a zero one
    term, s_out, t_out = make(t_map[:, :2], t_map, logits, logits)
    assert isinstance(term.connector, nn.Conv2d) and term.connector.weight.shape == (3, 2, 1, 1)
    with torch.no_grad():
        term.connector.weight.zero_()
        term.connector.weight[0, 0] = term.connector.weight[1, 1] = 1.0
    out = term(s_out, t_out, batch(4))
    assert out["dist_plus_channel"].item() > 0  # the third channel cannot be matched


def test_the_channel_relation_rewards_agreement_not_anti_correlation():
    # torchdistill adds rho itself; kdray's distance 1 - rho is 0 for a copy and 2 for a negated copy
    torch.manual_seed(2)
    t_map = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    logits = torch.randn(2, 4, dtype=torch.float64)
    same = make(t_map.clone(), t_map, logits, logits)
    negated = make(-t_map, t_map, logits, logits)
    assert same[0](same[1], same[2], batch(2))["dist_plus_channel"].item() == pytest.approx(0.0, abs=1e-9)
    assert negated[0](negated[1], negated[2], batch(2))["dist_plus_channel"].item() == pytest.approx(2.0)


def test_bad_shapes_and_parameters_are_one_line():
    t_map = torch.randn(2, 3, 2, 2)
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 5\)"):
        term, s_out, t_out = make(t_map, t_map, torch.randn(2, 4), torch.randn(2, 5))
        term(s_out, t_out, batch(2))
    with pytest.raises(ValueError, match=r"'s'.*\(2, 3\).*'t'.*\(2, 3, 2, 2\)"):
        make(torch.randn(2, 3), t_map, torch.randn(2, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="dist_plus"):
        create_method("dist_plus", iota=-1.0)
