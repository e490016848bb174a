"""ICKD: the inter-channel-correlation loss by hand on fixed tensors, the grid partition, shape errors."""
from __future__ import annotations

import math

import pytest
import torch

from tests.test_feature_methods import close, make_term, pin_identity, run

pytestmark = pytest.mark.usefixtures("one_thread")


def icc_by_hand(f, b, rows, cols):
    """Row-normalised Gram of sample ``b``'s channel vectors over the given positions, as nested lists."""
    c = f.shape[1]
    vec = [[f[b, m, i, j].item() for i in rows for j in cols] for m in range(c)]
    gram = [[sum(x * y for x, y in zip(vec[m], vec[n])) for n in range(c)] for m in range(c)]
    return [[g / math.sqrt(sum(v * v for v in row)) for g in row] for row in gram]


def ickd_by_hand(s, t, cells):
    b, c = t.shape[:2]
    total = 0.0
    for rows, cols in cells:
        for k in range(b):
            gs, gt = icc_by_hand(s, k, rows, cols), icc_by_hand(t, k, rows, cols)
            total += sum((gt[m][n] - gs[m][n]) ** 2 for m in range(c) for n in range(c)) / (c * b)
    return total / len(cells)


def test_ickd_value_identity_connector():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    term, s_out, t_out = make_term("ickd", [s], [t])
    pin_identity(term.connector)
    assert term.weight == 2.5
    expected = 2.5 * ickd_by_hand(s, t, [(range(2), range(2))])
    assert close(run(term, s_out, t_out)["ickd"], expected)


def test_ickd_grid_partition_averages_cells():
    torch.manual_seed(1)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    term, s_out, t_out = make_term("ickd", [s], [t], weight=1.0, grid=2)
    pin_identity(term.connector)
    cells = [(range(i, i + 2), range(j, j + 2)) for i in (0, 2) for j in (0, 2)]
    assert close(run(term, s_out, t_out)["ickd"], ickd_by_hand(s, t, cells))


def test_ickd_uses_last_point_and_connector_maps_channels():
    s0, t0 = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    s1, t1 = torch.randn(2, 4, 2, 2), torch.randn(2, 6, 2, 2)
    term, s_out, t_out = make_term("ickd", [s0, s1], [t0, t1])
    assert term.connector[0].in_channels == 4 and term.connector[0].out_channels == 6
    assert torch.isfinite(run(term, s_out, t_out)["ickd"])


def test_ickd_bad_shapes_raise_naming_both():
    with pytest.raises(ValueError) as err:
        make_term("ickd", [torch.randn(2, 3, 3, 3)], [torch.randn(2, 5, 3, 3)], grid=2)
    msg = str(err.value)
    assert "(2, 3, 3, 3)" in msg and "(2, 5, 3, 3)" in msg and "grid=2" in msg
    with pytest.raises(ValueError) as err:
        make_term("ickd", [torch.randn(2, 3, 2, 2)], [torch.randn(3, 5, 2, 2)])
    assert "(2, 3, 2, 2)" in str(err.value) and "(3, 5, 2, 2)" in str(err.value)
