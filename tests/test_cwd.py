"""CWD: the channel-wise spatial-softmax KL by hand on fixed tensors, the connector, shape errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from tests.test_feature_methods import close, make_term, run

pytestmark = pytest.mark.usefixtures("one_thread")


def cwd_by_hand(s, t, tau):
    b, c, h, w = t.shape
    total = 0.0
    for k in range(b):
        for m in range(c):
            xs = [s[k, m, i, j].item() / tau for i in range(h) for j in range(w)]
            xt = [t[k, m, i, j].item() / tau for i in range(h) for j in range(w)]
            zs, zt = sum(math.exp(x) for x in xs), sum(math.exp(x) for x in xt)
            for a, q in zip(xs, xt):
                ps, pt = math.exp(a) / zs, math.exp(q) / zt
                total += pt * math.log(pt / ps)
    return tau ** 2 * total / (b * c)


def test_cwd_value_same_channels_no_connector():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 2, 3), torch.randn(2, 3, 2, 3)
    term, s_out, t_out = make_term("cwd", [s], [t])
    assert isinstance(term.connector, nn.Identity) and list(term.parameters()) == []
    assert (term.weight, term.temperature) == (3.0, 4.0)
    assert close(run(term, s_out, t_out)["cwd"], 3.0 * cwd_by_hand(s, t, 4.0))


def test_cwd_value_with_fixed_connector_and_temperature_one():
    torch.manual_seed(1)
    s, t = torch.randn(2, 2, 2, 2), torch.randn(2, 3, 2, 2)
    term, s_out, t_out = make_term("cwd", [s], [t], weight=1.0, temperature=1.0)
    conv = term.connector
    assert (conv.in_channels, conv.out_channels) == (2, 3)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[0, 0] = conv.weight[1, 1] = conv.weight[2, 0] = 1.0
    s_mapped = torch.stack([s[:, 0], s[:, 1], s[:, 0]], dim=1)
    assert close(run(term, s_out, t_out)["cwd"], cwd_by_hand(s_mapped, t, 1.0))
    term2, s2, t2 = make_term("cwd", [t], [t])
    assert close(run(term2, s2, t2)["cwd"], 0.0)


def test_cwd_bad_shapes_raise_naming_both():
    with pytest.raises(ValueError) as err:
        make_term("cwd", [torch.randn(2, 3)], [torch.randn(2, 5, 3, 3)])
    assert "(2, 3)" in str(err.value) and "(2, 5, 3, 3)" in str(err.value)
    with pytest.raises(ValueError) as err:
        make_term("cwd", [torch.randn(2, 3, 2, 2)], [torch.randn(4, 3, 2, 2)])
    assert "(2, 3, 2, 2)" in str(err.value) and "(4, 3, 2, 2)" in str(err.value)
