"""embedding_mse / embedding_cosine against hand-derived values, the width projection, gradient flow."""
import math

import torch

from kdray.algorithms.base import Batch, ModelOutput, create_method


def outputs(s, t):
    return ModelOutput(torch.zeros(len(s), 2), {"embedding": s}), ModelOutput(torch.zeros(len(t), 2),
                                                                              {"embedding": t})


def term(name, **kw):
    m = create_method(name, **kw)
    m.student_points, m.teacher_points = ["embedding"], ["embedding"]
    return m


BATCH = Batch(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), torch.arange(2))
S = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
T = torch.tensor([[1.0, 1.0], [0.0, 2.0]])


def test_mse_by_hand():
    mse = term("embedding_mse", weight=2.0)
    out = mse(*outputs(S, T), BATCH)["embedding_mse"]
    assert abs(float(out) - 2.0 * 1 / 4) < 1e-6  # one squared difference of 1 among 4 entries


def test_normalized_mse_is_two_minus_two_cos_over_width():
    mse = term("embedding_mse", normalize=True)
    out = float(mse(*outputs(S, T), BATCH)["embedding_mse"])
    expected = ((2 - 2 / math.sqrt(2)) + 0.0) / 4  # sample 0: 2 - 2 cos 45deg; sample 1: same direction
    assert abs(out - expected) < 1e-6


def test_cosine_by_hand_and_scale_free():
    cos = term("embedding_cosine")
    out = float(cos(*outputs(S, T), BATCH)["embedding_cosine"])
    assert abs(out - (1 - 1 / math.sqrt(2)) / 2) < 1e-6
    assert abs(float(cos(*outputs(5 * S, T), BATCH)["embedding_cosine"]) - out) < 1e-6  # length is free


def test_projection_when_widths_differ_and_gradients():
    torch.manual_seed(0)
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 5, requires_grad=True)
    for name in ("embedding_mse", "embedding_cosine"):
        m = term(name)
        with torch.no_grad():
            m.build(*outputs(s, t), 4)
        assert m.projection.weight.shape == (5, 3)
        loss = m(*outputs(s, t), BATCH)[name]
        loss.backward()
        assert s.grad.abs().sum() > 0 and m.projection.weight.grad.abs().sum() > 0
        assert t.grad is None  # the teacher's embedding is a target: no gradient reaches it
        s.grad = None
    same = term("embedding_mse")
    same.build(*outputs(S, T), 2)
    assert same.projection is None  # equal widths: the student's own embedding is matched, as in the paper
