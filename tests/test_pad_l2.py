"""PAD-L2: the per-sample variance-weighted L2 by hand on fixed tensors, with a fixed variance head."""
from __future__ import annotations

import math

import pytest
import torch

from tests.test_feature_methods import close, make_term, run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_pad_l2_value_with_fixed_variance_head():
    torch.manual_seed(0)
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    term, s_out, t_out = make_term("pad_l2", [s], [t], weight=2.0)
    assert len(list(term.connector.parameters())) == 0  # equal widths: no connector
    # at build the head is zero: sigma = 1, the loss is 1/2 of the summed squared error
    plain = sum(sum((s[n, d] - t[n, d]).item() ** 2 for d in range(4)) / 2 for n in range(3)) / 3
    assert close(run(term, s_out, t_out)["pad_l2"], 2.0 * plain)
    w, b = [0.5, -1.0, 0.25, 2.0], 0.3
    with torch.no_grad():
        term.log_variance.weight.copy_(torch.tensor([w]))
        term.log_variance.bias.fill_(b)
    expected = 0.0
    for n in range(3):
        log_var = sum(w[d] * s[n, d].item() for d in range(4)) + b
        sq = sum((s[n, d] - t[n, d]).item() ** 2 for d in range(4))
        expected += sq / (2 * math.exp(log_var)) + math.log(math.sqrt(math.exp(log_var)))
    assert close(run(term, s_out, t_out)["pad_l2"], 2.0 * expected / 3)


def test_pad_l2_connector_for_other_widths_and_bad_shapes():
    term, s_out, t_out = make_term("pad_l2", [torch.randn(2, 3)], [torch.randn(2, 5)])
    assert term.connector[0].out_channels == 5 and term.log_variance.in_features == 3
    assert torch.isfinite(run(term, s_out, t_out)["pad_l2"])
    with pytest.raises(ValueError) as err:
        make_term("pad_l2", [torch.randn(2, 3)], [torch.randn(2, 5, 2, 2)])
    assert "(2, 3)" in str(err.value) and "(2, 5, 2, 2)" in str(err.value)
