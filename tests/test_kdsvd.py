"""KD-SVD on maps with known singular vectors: the candidate choice, the sign alignment and the RBF
correlation of consecutive points by hand; too few points / too low a rank refused."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.test_feature_methods import close, make_term, run

pytestmark = pytest.mark.usefixtures("one_thread")
R = 1 / math.sqrt(2)


def as_feature(x):
    """An ``HW x C`` matrix as a one-sample ``(1, C, 1, HW)`` map (row ``p`` is position ``p``)."""
    return torch.tensor(x, dtype=torch.float64).T[None, :, None, :]


def top_right_vector_sign(x, index):
    """The sign LAPACK gives entry ``index`` of the top right singular vector (SVD's sign is arbitrary;
    the method inherits the teacher's, so the expected value is written for it)."""
    return float(np.sign(np.linalg.svd(np.asarray(x))[2][0][index]))


def test_kdsvd_value_by_hand_on_known_singular_vectors():
    # point 1: teacher = student = diag(3, 1): top vector e0, the student's aligned copy equals the teacher's.
    x1 = [[3.0, 0.0], [0.0, 1.0]]
    # point 2: teacher's top vector (e3 + e4)/sqrt2 (value 5); the student's top k+3 = 4 are e0..e3, so the
    # best candidate is e3 (|cos| = 1/sqrt2), flipped to the teacher's sign.
    v = np.zeros((5, 5))
    v[:, 0] = [0, 0, 0, R, R]
    v[:, 1] = [0, 0, 0, R, -R]
    v[0, 2] = v[1, 3] = v[2, 4] = 1.0
    t2 = np.eye(5) @ np.diag([5.0, 1.0, 4.0, 3.0, 2.0]) @ v.T
    s2 = np.diag([5.0, 4.0, 3.0, 2.0, 1.0])
    term, s_out, t_out = make_term("kdsvd", [as_feature(x1), as_feature(s2)], [as_feature(x1), as_feature(t2)])
    assert (term.weight, term.k, term.sigma) == (1.0, 1, 8.0)
    rho, sig = top_right_vector_sign(x1, 0), top_right_vector_sign(t2, 3)
    v1 = [rho, 0.0]  # both models at point 1
    vt2 = [0.0, 0.0, 0.0, sig * R, sig * R]
    vs2 = [0.0, 0.0, 0.0, sig, 0.0]
    expected = sum((math.exp(-(vs2[m] - v1[n]) ** 2 / 8) - math.exp(-(vt2[m] - v1[n]) ** 2 / 8)) ** 2
                   for m in range(5) for n in range(2))
    assert expected > 0
    assert close(run(term, s_out, t_out)["kdsvd"], expected)


def test_kdsvd_identical_features_give_zero_and_connector_maps_channels():
    torch.manual_seed(0)
    fs = [torch.randn(3, 4, 4, 4), torch.randn(3, 6, 2, 2)]
    term, s_out, t_out = make_term("kdsvd", fs, fs)
    assert close(run(term, s_out, t_out)["kdsvd"], 0.0)
    term, s_out, t_out = make_term("kdsvd", [torch.randn(3, 2, 4, 4), torch.randn(3, 3, 2, 2)], fs)
    assert term.connectors[1][0].out_channels == 6
    assert torch.isfinite(run(term, s_out, t_out)["kdsvd"])


def test_kdsvd_refuses_one_point_and_too_low_rank():
    with pytest.raises(ValueError, match="at least two"):
        make_term("kdsvd", [torch.randn(2, 3, 2, 2)], [torch.randn(2, 3, 2, 2)])
    with pytest.raises(ValueError) as err:
        make_term("kdsvd", [torch.randn(2, 3, 2, 2), torch.randn(2, 3, 1, 1)],
                  [torch.randn(2, 3, 2, 2), torch.randn(2, 3, 1, 1)], k=2)
    assert "(2, 3, 1, 1)" in str(err.value) and "k=2" in str(err.value)
    with pytest.raises(ValueError) as err:
        make_term("kdsvd", [torch.randn(2, 3, 2, 2)] * 2, [torch.randn(4, 3, 2, 2)] * 2)
    assert "(2, 3, 2, 2)" in str(err.value) and "(4, 3, 2, 2)" in str(err.value)


def test_svd_gradient_matches_autograd_and_stays_finite_with_dead_channels():
    from kdray.algorithms.feature.kdsvd import right_singular_vectors

    torch.manual_seed(0)
    for shape in [(2, 6, 2, 2), (2, 3, 3, 3)]:  # wide and tall HW x C matrices
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        w, w2 = torch.randn(shape[0], shape[1], 3, dtype=torch.float64), torch.randn(shape[0], 3, dtype=torch.float64)
        v, s = right_singular_vectors(x, 3)
        ((v * w).sum() + (s * w2).sum()).backward()
        ours, x.grad = x.grad.clone(), None
        _, sv, vh = torch.linalg.svd(x.flatten(2).transpose(1, 2), full_matrices=False)
        v_ref = torch.nn.functional.normalize(vh.transpose(1, 2)[:, :, :3], dim=1)
        s_ref = torch.nn.functional.normalize(sv[:, :3], dim=1)
        ((v_ref * w).sum() + (s_ref * w2).sum()).backward()
        torch.testing.assert_close(ours, x.grad)
    x = torch.relu(torch.randn(2, 6, 4, 4))
    x[:, 3:] = 0  # three dead channels: repeated zero singular values (autograd's SVD gives NaN here)
    x.requires_grad_(True)
    v, s = right_singular_vectors(x, 2)
    (v.sum() + s.sum()).backward()
    assert torch.isfinite(x.grad).all()
