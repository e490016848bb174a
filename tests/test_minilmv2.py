"""MiniLMv2 on fixed tensors: Q-Q / K-K / V-V relations after re-splitting the concatenated heads into
num_relation_heads, KL averaged over relation heads and real query tokens; the teacher layer chosen (default
last) and checked; different head counts and widths train; gradients reach the student only."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from kdray.algorithms import create_method
from kdray.algorithms.base import Batch, ModelOutput
from kdray.algorithms.distiller import Distiller
from kdray.algorithms.text.contract import LayerMapError
from tests.text_features import TinyEncoder, assert_gradients_reach_student_only, short_text_training

pytestmark = pytest.mark.usefixtures("one_thread")
G = 9.0
KL_34 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # KL([3/4, 1/4] || [1/2, 1/2])
DIFFERENT_HEADS = {"teacher": {"num_attention_heads": 4}, "num_relation_heads": 4}


def geometry(layers, hidden, heads=1):
    return SimpleNamespace(num_layers=layers, hidden_size=hidden, num_attention_heads=heads)


def test_relations_over_re_split_heads_hand_derived():
    term = create_method("minilmv2", num_relation_heads=2)
    assert term.resolve_student_points(geometry(2, 2, heads=1), "student") == ["queries.1", "keys.1", "values.1"]
    assert term.resolve_teacher_points(geometry(3, 4, heads=2), "teacher") == ["queries.2", "keys.2", "values.2"]
    a = math.sqrt(math.sqrt(2.0) * math.log(3.0))  # teacher relation head 0 (units 0:2, d_r = 2): row 0 = [3/4, 1/4]
    teacher = torch.tensor([[[a, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [G, G, G, G]]])
    # student (1 attention head, 2 units) re-split into 2 relation heads of d_r = 1: unit 0 with b^2 = ln 3 gives
    # head 0 row 0 = [3/4, 1/4] (the teacher's); as one head of 2 units it would be softmax([ln3 / sqrt 2, 0])
    matching = torch.tensor([[[math.sqrt(math.log(3.0)), 0.0], [0.0, 0.0], [G, G]]])
    zeros = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [G, G]]])
    s_feats = {"queries.1": matching, "keys.1": zeros, "values.1": zeros}
    t_feats = {"queries.2": teacher, "keys.2": teacher, "values.2": torch.zeros(1, 3, 4)}
    batch = Batch({"input_ids": torch.tensor([[3, 4, 0]]), "attention_mask": torch.tensor([[1, 1, 0]])},
                  torch.tensor([0]), torch.tensor([0]))
    losses = term(ModelOutput(torch.zeros(1, 2), s_feats), ModelOutput(torch.zeros(1, 2), t_feats), batch)
    assert losses["minilmv2_qq"].item() == pytest.approx(0.0, abs=1e-6)
    # one of 2 relation heads x 2 real query rows differs: KL_34 / 4
    assert losses["minilmv2_kk"].item() == pytest.approx(KL_34 / 4, rel=1e-5)
    assert losses["minilmv2_vv"].item() == pytest.approx(0.0, abs=1e-6)


def test_defaults_and_teacher_layer_choice():
    term = create_method("minilmv2")
    assert (term.num_relation_heads, term.teacher_layer) == (48, None)
    upper = create_method("minilmv2", num_relation_heads=4, teacher_layer=3)
    upper.resolve_student_points(geometry(2, 16), "student")
    assert upper.resolve_teacher_points(geometry(4, 24), "teacher") == ["queries.2", "keys.2", "values.2"]


def test_refusals_in_one_line():
    with pytest.raises(LayerMapError, match=r"^minilmv2.teacher_layer names teacher layer 5, but the teacher has 4 "
                                            r"layers \(allowed 1..4\)$"):
        Distiller(TinyEncoder(), [create_method("minilmv2", num_relation_heads=4, teacher_layer=5)]
                  ).resolve_teacher_points(TinyEncoder(num_layers=4, hidden_size=24))
    with pytest.raises(LayerMapError, match="num_relation_heads=48 must divide the student's hidden size 16"):
        Distiller(TinyEncoder(), [create_method("minilmv2")])


def test_different_head_counts_and_widths_train_with_gradients_to_the_student_only():
    assert_gradients_reach_student_only("minilmv2", **DIFFERENT_HEADS)
    losses = short_text_training("minilmv2", **DIFFERENT_HEADS)
    assert losses[-1] < 0.5 * losses[0], losses
