"""The distilled BiLSTM student (Tang et al. 2019): called with a text mapping, padding packed away (padded ids
change nothing, a padded row equals the same sentence unpadded), the parameter count of its layers, left
padding refused, and distillation from a transformer teacher with ``logit_matching`` (the paper's logit MSE)."""
from __future__ import annotations

import pytest
import torch

from kdray.algorithms import create_method
from kdray.algorithms.distiller import Distiller, Teacher
from kdray.models import create_model, model_family
from tests.text_features import VOCAB, TinyEncoder, text_batch

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(vocab_size=VOCAB, embedding_dim=8, hidden_size=6, mlp_size=5)


def test_paper_sizes_and_parameter_count():
    model = create_model("text_bilstm", 2)
    assert model_family("text_bilstm") == "text"
    v, e, h, m, c = 30522, 300, 150, 200, 2
    lstm = 2 * (4 * h * (e + h) + 2 * 4 * h)  # two directions: input + recurrent weights, two bias vectors
    expected = v * e + lstm + (2 * h * m + m) + (m * c + c)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_padding_is_packed_away():
    torch.manual_seed(0)
    model = create_model("text_bilstm", 3, **SMALL).eval()
    batch = text_batch(batch_size=3, length=6)
    with torch.no_grad():
        logits = model(**batch.inputs)
        ids = batch.inputs["input_ids"].clone()
        ids[2, -2:] = 17  # row 2 has 2 padded positions
        assert torch.allclose(model(input_ids=ids, attention_mask=batch.inputs["attention_mask"]), logits, atol=1e-6)
        alone = model(input_ids=batch.inputs["input_ids"][2:, :4])  # the same sentence without padding
    assert torch.allclose(alone, logits[2:], atol=1e-6)
    assert logits.shape == (3, 3)


def test_left_padding_is_refused_in_one_line():
    model = create_model("text_bilstm", 2, **SMALL)
    with pytest.raises(ValueError, match=r"^text_bilstm expects right-padded inputs .*padding_side='right'$"):
        model(input_ids=torch.ones(1, 3, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1]]))


def test_logit_matching_from_a_transformer_teacher_closes_the_gap():
    torch.manual_seed(0)
    teacher_model = TinyEncoder(num_layers=2, num_classes=3).eval()
    student = create_model("text_bilstm", 3, **SMALL)
    distiller = Distiller(student, [create_method("logit_matching", weight=2.0)], ce_weight=0.0)
    teacher = Teacher(teacher_model, distiller.resolve_teacher_points(teacher_model))
    batch = text_batch(batch_size=8, length=6)
    distiller.build(batch.inputs, teacher)
    with torch.no_grad():
        t_out = teacher(batch.inputs)
    opt = torch.optim.Adam(distiller.parameters(), lr=3e-2)
    gaps = []
    for _ in range(60):
        logits, losses = distiller(batch, t_out)
        gaps.append(float(((logits.detach() - t_out.logits) ** 2).sum(1).mean()))
        assert set(losses) == {"logit_matching"}  # ce_weight 0: Tang et al. with alpha = 0
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    assert all(p.grad is None for p in teacher_model.parameters())
    assert gaps[-1] < 0.1 * gaps[0], (gaps[0], gaps[-1])


def test_layer_wise_text_terms_refuse_the_bilstm_in_one_line():
    with pytest.raises(ValueError, match=r"^student \(TextBiLSTM\) has no integer num_layers, hidden_size, "
                                         r"num_attention_heads"):
        Distiller(create_model("text_bilstm", 2, **SMALL), [create_method("minilm")])
