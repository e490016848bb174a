"""TinyBERT on fixed tensors: embedding and hidden MSE through the learned projections, attention-score MSE on
pre-softmax scores computed from Q / K with padded positions excluded, prediction-layer soft CE; the uniform
layer map g(m) = m N / M; refusals; gradients reach the student and the projections, never the teacher."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from kdray.algorithms import create_method
from kdray.algorithms.base import Batch, ModelOutput
from kdray.algorithms.distiller import Distiller
from kdray.algorithms.text.contract import LayerMapError
from kdray.algorithms.text.tinybert import uniform_layer_map
from tests.text_features import TinyEncoder, assert_gradients_reach_student_only, short_text_training

pytestmark = pytest.mark.usefixtures("one_thread")
G = 9.0  # garbage at the padded token: excluded from every MSE


def geometry(layers, hidden=2, heads=1):
    return SimpleNamespace(num_layers=layers, hidden_size=hidden, num_attention_heads=heads)


def tokens(real, dim=2):
    """(1, 2, dim): the real token 0 and a padded token 1 full of garbage."""
    return torch.tensor([[real, [G] * dim]])


def test_uniform_layer_map_as_the_paper():
    assert uniform_layer_map(4, 12) == {1: 3, 2: 6, 3: 9, 4: 12}
    assert uniform_layer_map(2, 4) == {1: 2, 2: 4}


def test_all_four_losses_hand_derived():
    term = create_method("tinybert")
    assert term.resolve_student_points(geometry(1), "student") == ["hidden_states.0", "hidden_states.1",
                                                                   "queries.0", "keys.0"]
    assert term.resolve_teacher_points(geometry(2), "teacher") == ["hidden_states.0", "hidden_states.2",
                                                                   "queries.1", "keys.1"]
    s_feats = {"hidden_states.0": tokens([1.0, 2.0]), "hidden_states.1": tokens([1.0, 1.0]),
               "queries.0": tokens([1.0, 1.0]), "keys.0": tokens([1.0, 1.0])}
    t_feats = {"hidden_states.0": tokens([1.0, 0.0]), "hidden_states.2": tokens([2.0, 3.0]),
               "queries.1": tokens([2.0, 0.0]), "keys.1": tokens([3.0, 0.0])}
    s_out, t_out = ModelOutput(torch.tensor([[0.0, 0.0]]), s_feats), ModelOutput(torch.tensor([[math.log(3.0), 0.0]]),
                                                                                 t_feats)
    term.build(s_out, t_out, 0)
    with torch.no_grad():
        term.embedding_projection.weight.copy_(torch.eye(2))
        term.embedding_projection.bias.zero_()
        term.hidden_projection.weight.copy_(torch.diag(torch.tensor([2.0, 1.0])))
        term.hidden_projection.bias.zero_()
    batch = Batch({"input_ids": torch.tensor([[4, 0]]), "attention_mask": torch.tensor([[1, 0]])},
                  torch.tensor([1]), torch.tensor([0]))
    losses = term(s_out, t_out, batch)
    assert set(losses) == {"tinybert_embedding", "tinybert_hidden", "tinybert_attention", "tinybert_prediction"}
    assert losses["tinybert_embedding"].item() == pytest.approx(2.0)  # ([1,2] - [1,0])^2 / 2 units
    assert losses["tinybert_hidden"].item() == pytest.approx(2.0)  # ([2,1] - [2,3])^2 / 2 units
    # scores q.k / sqrt(2): student 2 / sqrt 2 = sqrt 2, teacher 6 / sqrt 2 = 3 sqrt 2 -> (2 sqrt 2)^2 = 8
    assert losses["tinybert_attention"].item() == pytest.approx(8.0, rel=1e-5)
    # soft CE at t = 1: -(3/4 log 1/2 + 1/4 log 1/2) = log 2
    assert losses["tinybert_prediction"].item() == pytest.approx(math.log(2.0), rel=1e-6)


def test_defaults_follow_the_paper():
    term = create_method("tinybert")
    assert (term.temperature, term.ce_weight, term.layer_map) == (1.0, 0.0, None)
    assert term.provides_ce  # no hard-label CE unless ce_weight > 0


def test_refusals_name_the_cause_in_one_line():
    with pytest.raises(LayerMapError, match=r"^tinybert.layer_map names teacher layer 7, but the teacher has 4 "
                                            r"layers \(allowed 1..4\)$"):
        Distiller(TinyEncoder(num_layers=2), [create_method("tinybert", layer_map={1: 2, 2: 7})]
                  ).resolve_teacher_points(TinyEncoder(num_layers=4))
    with pytest.raises(LayerMapError, match="needs equal head counts, but the student has 2 heads and the teacher "
                                            "4; use minilmv2"):
        Distiller(TinyEncoder(num_layers=2), [create_method("tinybert")]).resolve_teacher_points(
            TinyEncoder(num_layers=4, hidden_size=24, num_attention_heads=4))
    with pytest.raises(LayerMapError, match="needs a student no deeper than the teacher, got 3 > 2 layers"):
        Distiller(TinyEncoder(num_layers=3), [create_method("tinybert")]).resolve_teacher_points(
            TinyEncoder(num_layers=2))
    with pytest.raises(ValueError, match="tinybert weights must be >= 0"):
        create_method("tinybert", attention_weight=-1.0)


def test_gradients_reach_student_and_projections_only_and_training_lowers_the_loss():
    assert_gradients_reach_student_only("tinybert")
    losses = short_text_training("tinybert")
    assert losses[-1] < 0.5 * losses[0], losses


def test_features_of_another_length_are_refused_in_one_line():
    term = create_method("tinybert")
    term.resolve_student_points(geometry(1), "student")
    term.resolve_teacher_points(geometry(2), "teacher")
    s_feats = {p: tokens([1.0, 1.0]) for p in ("hidden_states.0", "hidden_states.1", "queries.0", "keys.0")}
    t_feats = {p: torch.zeros(1, 3, 2) for p in ("hidden_states.0", "hidden_states.2", "queries.1", "keys.1")}
    s_out, t_out = ModelOutput(torch.zeros(1, 2), s_feats), ModelOutput(torch.zeros(1, 2), t_feats)
    term.build(s_out, t_out, 0)
    batch = Batch({"input_ids": torch.ones(1, 2, dtype=torch.long)}, torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"^tinybert: student hidden_states.0 \(1, 2, 2\) and teacher hidden_states.0 "
                                         r"\(1, 3, 2\) differ in batch or sequence length; both models must read"):
        term(s_out, t_out, batch)
