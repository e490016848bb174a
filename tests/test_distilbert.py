"""DistilBERT's triple loss on fixed tensors (soft targets with T^2, the CE it provides, the cosine over real
tokens of the last hidden states), masked-LM logits, the paper-code defaults, refusals, and gradient flow."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from kdray.algorithms import create_method
from kdray.algorithms.base import Batch, ModelOutput
from kdray.algorithms.distiller import Distiller
from tests.text_features import TinyEncoder, assert_gradients_reach_student_only, short_text_training

pytestmark = pytest.mark.usefixtures("one_thread")
EQUAL_WIDTH = {"student": {"hidden_size": 24}}


def geometry(layers, hidden=2, heads=1):
    return SimpleNamespace(num_layers=layers, hidden_size=hidden, num_attention_heads=heads)


def resolved(**params):
    """A distilbert term resolved for a 2-layer student and a 4-layer teacher, both of hidden size 2."""
    term = create_method("distilbert", **params)
    assert term.resolve_student_points(geometry(2), "student") == ["hidden_states.2"]
    assert term.resolve_teacher_points(geometry(4), "teacher") == ["hidden_states.4"]
    return term


# token 0: same direction (cos 1); token 1: orthogonal (cos 0); token 2 padded: opposite (cos -1, excluded)
H_S = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
H_T = torch.tensor([[[3.0, 0.0], [0.0, 2.0], [-1.0, 0.0]]])
INPUTS = {"input_ids": torch.tensor([[5, 6, 0]]), "attention_mask": torch.tensor([[1, 1, 0]])}


def test_paper_code_defaults():
    term = create_method("distilbert")
    assert (term.temperature, term.alpha_ce, term.alpha_mlm, term.alpha_cos) == (2.0, 5.0, 2.0, 1.0)
    assert term.provides_ce and term.modality == "text"


def test_triple_loss_hand_derived_on_classification_logits():
    term = resolved()
    # teacher / T = [ln 3, 0] -> p_t = [3/4, 1/4]; student [0, 0] -> p_s = [1/2, 1/2]
    s = ModelOutput(torch.tensor([[0.0, 0.0]]), {"hidden_states.2": H_S})
    t = ModelOutput(torch.tensor([[2 * math.log(3.0), 0.0]]), {"hidden_states.4": H_T})
    losses = term(s, t, Batch(INPUTS, torch.tensor([0]), torch.tensor([0])))
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert losses["distilbert_soft"].item() == pytest.approx(5.0 * 4.0 * kl, rel=1e-5)
    assert losses["ce"].item() == pytest.approx(2.0 * math.log(2.0), rel=1e-6)
    assert losses["distilbert_cos"].item() == pytest.approx(1.0 * 0.5, rel=1e-6)  # (0 + 1) / 2 real tokens


def test_masked_lm_logits_use_only_positions_with_a_target():
    term = resolved(alpha_ce=1.0, alpha_mlm=1.0, alpha_cos=0.0)
    # position 0 has no MLM target (-100) and logits that would dominate; position 1: same as above
    s = ModelOutput(torch.tensor([[[9.0, -9.0], [0.0, 0.0], [0.0, 0.0]]]), {"hidden_states.2": H_S})
    t = ModelOutput(torch.tensor([[[-9.0, 9.0], [2 * math.log(3.0), 0.0], [0.0, 0.0]]]), {"hidden_states.4": H_T})
    losses = term(s, t, Batch(INPUTS, torch.tensor([[-100, 0, -100]]), torch.tensor([0])))
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert losses["distilbert_soft"].item() == pytest.approx(4.0 * kl, rel=1e-5)
    assert losses["ce"].item() == pytest.approx(math.log(2.0), rel=1e-6)
    assert "distilbert_cos" not in losses


def test_a_narrower_student_is_refused_in_one_line():
    distiller = Distiller(TinyEncoder(hidden_size=16), [create_method("distilbert")])
    with pytest.raises(ValueError, match=r"^distilbert: the cosine loss needs equal hidden sizes, but the student "
                                         r"has 16 and the teacher 24; use tinybert") as err:
        distiller.resolve_teacher_points(TinyEncoder(num_layers=4, hidden_size=24))
    assert "\n" not in str(err.value)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="distilbert.temperature must be > 0"):
        create_method("distilbert", temperature=0)
    with pytest.raises(ValueError, match="alpha_mlm / alpha_cos must be >= 0"):
        create_method("distilbert", alpha_cos=-1)


def test_gradients_reach_student_only_and_training_lowers_the_loss():
    assert_gradients_reach_student_only("distilbert", **EQUAL_WIDTH)
    losses = short_text_training("distilbert", **EQUAL_WIDTH)
    assert losses[-1] < 0.5 * losses[0], losses
