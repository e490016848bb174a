"""MiniLM on fixed tensors: last-layer attention-distribution KL and value-relation KL
(softmax(V V^T / sqrt(d_k))), averaged over heads and real query tokens, padded keys and queries excluded,
hidden sizes free, head counts must match; gradients reach the student only."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from kdray.algorithms import create_method
from kdray.algorithms.base import Batch, ModelOutput
from kdray.algorithms.distiller import Distiller, Teacher
from kdray.algorithms.text.contract import LayerMapError
from tests.text_features import TinyEncoder, assert_gradients_reach_student_only, short_text_training, text_batch

pytestmark = pytest.mark.usefixtures("one_thread")
G = 9.0
KL_34 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # KL([3/4, 1/4] || [1/2, 1/2])


def geometry(layers, hidden, heads=1):
    return SimpleNamespace(num_layers=layers, hidden_size=hidden, num_attention_heads=heads)


def test_attention_and_value_relation_kl_hand_derived():
    term = create_method("minilm")
    assert term.resolve_student_points(geometry(2, 1), "student") == ["attentions.1", "values.1"]
    assert term.resolve_teacher_points(geometry(3, 2), "teacher") == ["attentions.2", "values.2"]
    third = 1 / 3
    a_s = torch.tensor([[[[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [third, third, third]]]])
    a_t = torch.tensor([[[[0.75, 0.25, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]]])  # row 2: padded query
    v_s = torch.tensor([[[0.0], [0.0], [G]]])  # d_k = 1: relation rows uniform over the real keys
    a = math.sqrt(math.sqrt(2.0) * math.log(3.0))  # teacher d_k = 2: a^2 / sqrt 2 = ln 3 -> row 0 = [3/4, 1/4]
    v_t = torch.tensor([[[a, 0.0], [0.0, 0.0], [G, G]]])
    batch = Batch({"input_ids": torch.tensor([[3, 4, 0]]), "attention_mask": torch.tensor([[1, 1, 0]])},
                  torch.tensor([0]), torch.tensor([0]))
    losses = term(ModelOutput(torch.zeros(1, 2), {"attentions.1": a_s, "values.1": v_s}),
                  ModelOutput(torch.zeros(1, 2), {"attentions.2": a_t, "values.2": v_t}), batch)
    assert losses["minilm_attention"].item() == pytest.approx((KL_34 + math.log(2.0)) / 2, rel=1e-5)
    assert losses["minilm_value"].item() == pytest.approx((KL_34 + 0.0) / 2, rel=1e-5)  # row 1: both uniform


def test_identical_models_give_zero_loss():
    torch.manual_seed(0)
    model = TinyEncoder(num_layers=2)
    distiller = Distiller(model, [create_method("minilm")])
    distiller.resolve_teacher_points(model)
    batch = text_batch()
    teacher = Teacher(model, distiller.teacher_points)
    distiller.build(batch.inputs, teacher)
    with torch.no_grad():
        _, losses = distiller(batch, teacher(batch.inputs))
    assert losses["minilm_attention"].abs().item() < 1e-6 and losses["minilm_value"].abs().item() < 1e-6


def test_head_count_mismatch_is_refused_in_one_line():
    with pytest.raises(LayerMapError, match=r"^minilm transfers attention per head, so head counts must match: "
                                            r"student 2, teacher 4; use minilmv2"):
        Distiller(TinyEncoder(), [create_method("minilm")]).resolve_teacher_points(
            TinyEncoder(num_layers=4, hidden_size=24, num_attention_heads=4))


def test_gradients_reach_student_only_and_training_lowers_the_loss():
    assert_gradients_reach_student_only("minilm")
    losses = short_text_training("minilm")
    assert losses[-1] < 0.5 * losses[0], losses
