"""BERT-PKD's patient loss on fixed tensors: PKD-Skip / PKD-Last maps, only [CLS] states and only the mapped
layers count, the l2-normalised MSE scaled by beta; layer maps naming absent layers refused in one line."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kdray.algorithms import create_method
from kdray.algorithms.base import Batch, ModelOutput
from kdray.algorithms.distiller import Distiller
from kdray.algorithms.text.bert_pkd import pkd_layer_map
from kdray.algorithms.text.contract import LayerMapError
from tests.text_features import TinyEncoder, assert_gradients_reach_student_only, short_text_training

pytestmark = pytest.mark.usefixtures("one_thread")
EQUAL_WIDTH = {"student": {"hidden_size": 24, "num_layers": 3}}


def geometry(layers, hidden=2):
    return SimpleNamespace(num_layers=layers, hidden_size=hidden, num_attention_heads=1)


def test_skip_and_last_maps_as_the_paper_for_12_to_6():
    assert pkd_layer_map("skip", 6, 12) == {1: 2, 2: 4, 3: 6, 4: 8, 5: 10}
    assert pkd_layer_map("last", 6, 12) == {1: 7, 2: 8, 3: 9, 4: 10, 5: 11}
    assert pkd_layer_map("skip", 3, 12) == {1: 4, 2: 8}


def test_patient_loss_hand_derived():
    term = create_method("bert_pkd")
    assert term.beta == 100.0 and term.strategy == "skip"
    assert term.resolve_student_points(geometry(3), "student") == ["hidden_states.1", "hidden_states.2"]
    assert term.resolve_teacher_points(geometry(6), "teacher") == ["hidden_states.2", "hidden_states.4"]
    junk = torch.tensor([[100.0, -7.0]])  # token 1: not [CLS], must not count
    s_feats = {"hidden_states.1": torch.stack([torch.tensor([[3.0, 4.0]]), junk], 1),  # -> [0.6, 0.8]
               "hidden_states.2": torch.stack([torch.tensor([[1.0, 0.0]]), junk], 1)}
    t_feats = {"hidden_states.2": torch.stack([torch.tensor([[0.0, 5.0]]), -junk], 1),  # -> [0, 1]
               "hidden_states.4": torch.stack([torch.tensor([[2.0, 0.0]]), -junk], 1)}   # -> [1, 0]
    batch = Batch({"input_ids": torch.ones(1, 2, dtype=torch.long)}, torch.tensor([0]), torch.tensor([0]))
    losses = term(ModelOutput(torch.zeros(1, 2), s_feats), ModelOutput(torch.zeros(1, 2), t_feats), batch)
    # layer 1: (0.6 - 0)^2 + (0.8 - 1)^2 = 0.4; layer 2: 0; mean over 1 sample x 2 layers x 2 units = 0.1
    assert losses["bert_pkd"].item() == pytest.approx(100.0 * 0.1, rel=1e-5)


def test_last_strategy_and_explicit_map_pick_those_teacher_layers():
    last = create_method("bert_pkd", strategy="last")
    last.resolve_student_points(geometry(3), "student")
    assert last.resolve_teacher_points(geometry(6), "teacher") == ["hidden_states.4", "hidden_states.5"]
    explicit = create_method("bert_pkd", layer_map={"2": "6"})  # YAML may give string keys
    assert explicit.resolve_student_points(geometry(3), "student") == ["hidden_states.2"]
    assert explicit.resolve_teacher_points(geometry(6), "teacher") == ["hidden_states.6"]


def test_layer_maps_naming_absent_layers_are_refused_in_one_line():
    distiller = Distiller(TinyEncoder(num_layers=3, hidden_size=24), [create_method("bert_pkd", layer_map={1: 5})])
    with pytest.raises(LayerMapError, match=r"^bert_pkd.layer_map names teacher layer 5, but the teacher has 4 "
                                            r"layers \(allowed 1..4\)$"):
        distiller.resolve_teacher_points(TinyEncoder(num_layers=4, hidden_size=24))
    with pytest.raises(LayerMapError, match=r"^bert_pkd.layer_map names student layer 4, but the student has 3"):
        Distiller(TinyEncoder(num_layers=3), [create_method("bert_pkd", layer_map={4: 2})])
    with pytest.raises(LayerMapError, match="a 1-layer student has no intermediate layer; give layer_map"):
        Distiller(TinyEncoder(num_layers=1), [create_method("bert_pkd")])
    with pytest.raises(ValueError, match="strategy must be one of"):
        create_method("bert_pkd", strategy="first")


def test_different_hidden_sizes_are_refused():
    distiller = Distiller(TinyEncoder(num_layers=2, hidden_size=16), [create_method("bert_pkd")])
    with pytest.raises(ValueError, match="hidden sizes must match: student 16, teacher 24"):
        distiller.resolve_teacher_points(TinyEncoder(num_layers=4, hidden_size=24))


def test_gradients_reach_student_only_and_training_lowers_the_loss():
    assert_gradients_reach_student_only("bert_pkd", **EQUAL_WIDTH)
    losses = short_text_training("bert_pkd", **EQUAL_WIDTH)
    assert losses[-1] < 0.5 * losses[0], losses


def test_a_feature_without_the_sequence_axis_is_refused_in_one_line():
    term = create_method("bert_pkd", layer_map={1: 2})
    term.resolve_student_points(geometry(2), "student")
    term.resolve_teacher_points(geometry(4), "teacher")
    batch = Batch({"input_ids": torch.ones(1, 2, dtype=torch.long)}, torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"^bert_pkd: student feature hidden_states.1 has shape \(1, 2\); the text "
                                         r"contract gives it 3 dimensions"):
        term(ModelOutput(torch.zeros(1, 2), {"hidden_states.1": torch.zeros(1, 2)}),
             ModelOutput(torch.zeros(1, 2), {"hidden_states.2": torch.zeros(1, 2, 2)}), batch)
