"""MGD: the masked-generation loss by hand with a pinned generator and the seeded masks; shapes refused."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from tests.test_feature_methods import close, make_term, run

pytestmark = pytest.mark.usefixtures("one_thread")


def pin_generator(gen):
    """3x3 convs -> centre-tap identity, zero bias: G(x) = relu(x)."""
    with torch.no_grad():
        for m in gen.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.zero_()
                m.bias.zero_()
                for o in range(m.weight.shape[0]):
                    m.weight[o, o, 1, 1] = 1.0


def expected_loss(s, t, keep, weight):
    b, c, h, w = t.shape
    total = sum((max(s[n, k, i, j].item() * keep(n, k, i, j), 0.0) - t[n, k, i, j].item()) ** 2
                for n in range(b) for k in range(c) for i in range(h) for j in range(w))
    return weight * total / b


@pytest.mark.parametrize("mask", ["channel", "spatial"])
def test_mgd_value_with_pinned_generator_and_seeded_mask(mask):
    torch.manual_seed(0)
    s, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    term, s_out, t_out = make_term("mgd", [s], [t], weight=0.5, mask_ratio=0.5, mask=mask, seed=7)
    assert isinstance(term.align, nn.Identity)
    pin_generator(term.generator)
    g = torch.Generator().manual_seed(7)
    u = torch.rand((3, 4, 1, 1) if mask == "channel" else (3, 1, 2, 2), generator=g)
    if mask == "channel":
        def keep(n, k, i, j):
            return float(u[n, k, 0, 0] >= 0.5)
    else:
        def keep(n, k, i, j):
            return float(u[n, 0, i, j] >= 0.5)
    assert close(run(term, s_out, t_out)["mgd"], expected_loss(s, t, keep, 0.5))
    # the next draw continues the seeded stream
    u = torch.rand(u.shape, generator=g)
    assert close(run(term, s_out, t_out)["mgd"], expected_loss(s, t, keep, 0.5))


def test_mgd_defaults_align_and_bad_shapes():
    term, s_out, t_out = make_term("mgd", [torch.randn(2, 3, 2, 2)], [torch.randn(2, 5, 2, 2)])
    assert (term.weight, term.mask_ratio, term.mask) == (7e-5, 0.15, "channel")
    assert (term.align.in_channels, term.align.out_channels) == (3, 5)
    assert torch.isfinite(run(term, s_out, t_out)["mgd"])
    with pytest.raises(ValueError) as err:
        make_term("mgd", [torch.randn(2, 3)], [torch.randn(2, 5)])
    assert "(2, 3)" in str(err.value) and "(2, 5)" in str(err.value)
    with pytest.raises(ValueError, match="mask"):
        make_term("mgd", [torch.randn(2, 3, 2, 2)], [torch.randn(2, 3, 2, 2)], mask="pixel")
