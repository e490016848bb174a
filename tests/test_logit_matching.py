"""Logit matching (Ba & Caruana, NIPS 2014): the paper's L2 value by hand, its properties, gradients, training."""
from __future__ import annotations

import math

import pytest
import torch

from kdray.algorithms import create_method, get_method, list_methods
from kdray.algorithms.base import Batch, ModelOutput
from kdray.algorithms.distiller import Distiller
from kdray.config import load_config
from kdray.models import create_model
from tests.jobs import digits_job
from tests.method_harness import assert_gradients_reach_student_and_connectors, short_training

S = [[2.0, 0.5, -1.0, 0.0], [0.3, 1.2, 0.1, -0.4]]
T = [[3.0, 1.0, -2.0, 0.5], [-0.5, 2.5, 0.0, 1.0]]
Y = [0, 1]


def _batch(targets):
    return Batch(torch.zeros(len(targets), 1), torch.tensor(targets), torch.arange(len(targets)))


def test_registered_with_metadata():
    cls = list_methods()["logit_matching"]
    assert cls is get_method("logit_matching")
    assert cls.kind == "response" and "Caruana" in cls.paper and not cls.provides_ce
    assert cls.default_student_points is None and cls.default_teacher_points is None
    assert create_method("logit_matching").weight == 1.0
    assert len(list_methods()) >= 20


def test_value_by_hand():
    # sample 0: diffs (-1, -0.5, 1, -0.5) -> ||d||^2 = 1 + 0.25 + 1 + 0.25 = 2.5
    # sample 1: diffs (0.8, -1.3, 0.1, -1.4) -> 0.64 + 1.69 + 0.01 + 1.96 = 4.3
    # 1/B * sum 1/2 ||d||^2 = (1.25 + 2.15) / 2 = 1.7; times weight 3
    out = create_method("logit_matching", weight=3.0)(ModelOutput(torch.tensor(S)), ModelOutput(torch.tensor(T)),
                                                       _batch(Y))
    assert set(out) == {"logit_matching"}
    assert out["logit_matching"].item() == pytest.approx(3.0 * 1.7, rel=1e-6)
    by_loop = sum(0.5 * sum((s - t) ** 2 for s, t in zip(rs, rt)) for rs, rt in zip(S, T)) / len(S)
    assert by_loop == pytest.approx(1.7)


def test_paper_normalisation_vs_mse_loss():
    """Sum over classes, 1/2, mean over samples: ``F.mse_loss`` (mean over B*K) times K/2."""
    torch.manual_seed(0)
    s, t = torch.randn(5, 7), torch.randn(5, 7) * 3
    value = create_method("logit_matching")(ModelOutput(s), ModelOutput(t), _batch([0] * 5))["logit_matching"]
    assert value.item() == pytest.approx(torch.nn.functional.mse_loss(s, t).item() * 7 / 2, rel=1e-6)


def test_zero_iff_logits_equal_and_not_shift_invariant():
    t = torch.tensor(T)
    term = create_method("logit_matching")
    assert term(ModelOutput(t.clone()), ModelOutput(t), _batch(Y))["logit_matching"].item() == 0.0
    # Unlike KD (softmax is shift invariant), regressing logits also transfers their offset: shifting
    # every logit by c costs K * c^2 / 2 per sample.
    shifted = term(ModelOutput(t + 2.0), ModelOutput(t), _batch(Y))["logit_matching"].item()
    assert shifted == pytest.approx(4 * 4.0 / 2)


def test_gradient_is_student_minus_teacher_over_batch():
    s = torch.tensor(S, requires_grad=True)
    t = torch.tensor(T)
    create_method("logit_matching", weight=2.0)(ModelOutput(s), ModelOutput(t), _batch(Y))["logit_matching"].backward()
    assert torch.allclose(s.grad, 2.0 * (s.detach() - t) / len(S))


def test_bad_weight_and_shape_mismatch():
    with pytest.raises(ValueError, match="weight"):
        create_method("logit_matching", weight=-1.0)
    with pytest.raises(ValueError, match="differ in shape"):
        create_method("logit_matching")(ModelOutput(torch.zeros(2, 4)), ModelOutput(torch.zeros(2, 5)), _batch(Y))


def test_distiller_adds_ce_and_config_validates(tmp_path):
    distiller = Distiller(create_model("digits_mlp", 10), [create_method("logit_matching")])
    batch = Batch(torch.rand(4, 1, 8, 8), torch.tensor([1, 2, 3, 4]), torch.arange(4))
    _, losses = distiller(batch, ModelOutput(torch.zeros(4, 10)))
    assert set(losses) == {"ce", "logit_matching"} and all(torch.isfinite(v) for v in losses.values())
    cfg = load_config(digits_job(tmp_path, methods=[{"name": "logit_matching", "weight": 0.5}]))
    assert cfg.methods[0].name == "logit_matching" and cfg.methods[0].params() == {"weight": 0.5}


def test_gradients_reach_student_not_teacher():
    assert_gradients_reach_student_and_connectors("logit_matching")


def test_short_training_finite_and_decreasing():
    losses = short_training("logit_matching")
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses
