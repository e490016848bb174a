"""The text feature-point contract: the tiny contract encoder's taps read by FeatureTap through the distiller's
``forward_with_features`` with mapping inputs, text terms listed by ``kdray list methods``, layer maps resolved
per model (and per teacher), and one-line refusals of models and inputs outside the contract."""
from __future__ import annotations

import pytest
import torch

from kdray.algorithms import create_method, list_methods
from kdray.algorithms.base import Batch
from kdray.algorithms.distiller import Distiller, Teacher, forward_with_features
from kdray.algorithms.text.contract import LayerMapError
from kdray.cli import main
from kdray.models.features import FeatureTap
from tests.text_features import TinyEncoder, make_text_pair, text_batch

pytestmark = pytest.mark.usefixtures("one_thread")
TEXT_TERMS = {"distilbert", "bert_pkd", "tinybert", "minilm", "minilmv2"}


def test_contract_taps_through_forward_with_features_with_mapping_inputs():
    torch.manual_seed(0)
    model = TinyEncoder(num_layers=2, hidden_size=16, num_attention_heads=2).eval()
    points = ["hidden_states.0", "hidden_states.2", "attentions.1", "queries.0", "keys.1", "values.1", "embedding"]
    batch = text_batch(batch_size=3, length=6)
    out = forward_with_features(model, FeatureTap(model, points), batch.inputs)
    assert out.logits.shape == (3, 3)
    assert out.features["hidden_states.0"].shape == (3, 6, 16) and out.features["hidden_states.2"].shape == (3, 6, 16)
    assert out.features["queries.0"].shape == out.features["values.1"].shape == (3, 6, 16)
    assert out.features["embedding"].shape == (3, 16)
    probs = out.features["attentions.1"]
    assert probs.shape == (3, 2, 6, 6)
    assert torch.allclose(probs.sum(-1), torch.ones(3, 2, 6))
    mask = batch.inputs["attention_mask"].bool()
    assert (probs[2][:, :, ~mask[2]] == 0).all() and (~mask[2]).sum() == 2  # padded keys get no attention
    # the pooled embedding ignores padding: changing a padded token's id leaves it unchanged
    ids = batch.inputs["input_ids"].clone()
    ids[2, -1] = 7
    again = forward_with_features(model, FeatureTap(model, ["embedding"]), {**batch.inputs, "input_ids": ids})
    assert torch.allclose(again.features["embedding"], out.features["embedding"], atol=1e-6)


def test_text_terms_are_listed_with_modality(capsys):
    methods = list_methods()
    assert TEXT_TERMS <= {n for n, c in methods.items() if c.modality == "text"}
    assert methods["kd"].modality == "any" and methods["fitnet"].modality == "any"
    assert main(["list", "methods"]) == 0
    listed = {line.split("\t")[0] for line in capsys.readouterr().out.splitlines()}
    assert TEXT_TERMS <= listed


def test_layer_maps_resolve_per_teacher_in_the_multi_teacher_distiller():
    torch.manual_seed(0)
    student = TinyEncoder(num_layers=2)
    shallow, deep = TinyEncoder(num_layers=4, hidden_size=24), TinyEncoder(num_layers=6, hidden_size=32)
    distiller = Distiller(student, [create_method("tinybert")], num_teachers=2)
    assert distiller.student_points[:3] == ["hidden_states.0", "hidden_states.1", "hidden_states.2"]
    assert "hidden_states.4" in distiller.resolve_teacher_points(shallow, member=0)
    assert "hidden_states.6" in distiller.resolve_teacher_points(deep, member=1)
    assert [t.pairs for t in distiller.terms] == [{1: 2, 2: 4}, {1: 3, 2: 6}]  # g(m) = m N / M per teacher
    teachers = [Teacher(m, distiller.member_points[i]) for i, m in enumerate((shallow, deep))]
    batch = text_batch()
    with torch.no_grad():
        s_out = distiller.student_forward(batch.inputs)
        for term, teacher in zip(distiller.terms, teachers):
            term.build(s_out, teacher(batch.inputs), 0)
    assert [t.hidden_projection.out_features for t in distiller.terms] == [24, 32]


def test_model_outside_the_contract_and_tensor_inputs_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"student \(Linear\) has no integer num_layers, hidden_size, "
                                         r"num_attention_heads: text terms need") as err:
        Distiller(torch.nn.Linear(2, 2), [create_method("minilm")])
    assert "\n" not in str(err.value)
    distiller, batch = Distiller(TinyEncoder(), [create_method("minilm")]), text_batch()
    teacher_model = TinyEncoder(num_layers=3)
    teacher = Teacher(teacher_model, distiller.resolve_teacher_points(teacher_model))
    distiller.build(batch.inputs, teacher)
    with pytest.raises(ValueError, match="batch.inputs is a Tensor; text terms need a mapping"):
        term = distiller.terms[0]
        term(distiller.student_forward(batch.inputs), teacher(batch.inputs),
             Batch(batch.inputs["input_ids"], batch.targets, batch.indices))


def test_explicit_points_bypassing_the_layer_map_are_refused():
    distiller = Distiller(TinyEncoder(), [create_method("tinybert", student_points=["hidden_states.1"],
                                                        teacher_points=["hidden_states.2"])])
    teacher_model = TinyEncoder(num_layers=4, hidden_size=24)
    teacher = Teacher(teacher_model, distiller.resolve_teacher_points(teacher_model))
    with pytest.raises(ValueError, match="tinybert picks its feature points from its layer map"):
        distiller.build(text_batch().inputs, teacher)


def test_a_layer_map_beyond_the_student_fails_at_construction():
    with pytest.raises(LayerMapError, match=r"^tinybert.layer_map names student layer 3, but the student has 2 "
                                            r"layers \(allowed 1..2\)$"):
        Distiller(TinyEncoder(num_layers=2), [create_method("tinybert", layer_map={1: 2, 3: 4})])


@pytest.mark.parametrize("method,kwargs", [
    ("distilbert", {"student": {"hidden_size": 24}}), ("bert_pkd", {"student": {"hidden_size": 24}}),
    ("tinybert", {}), ("minilm", {}), ("minilmv2", {"num_relation_heads": 4})])
def test_text_terms_under_bf16_autocast_stay_close_to_fp32(method, kwargs):
    """Models in bf16 autocast, terms in fp32 (KnowledgeTerm.__call__): each loss finite and within 5% (+ 0.02)."""
    distiller, teacher, batch = make_text_pair(method, **kwargs)
    with torch.no_grad():
        _, fp32 = distiller(batch, teacher(batch.inputs))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, bf16 = distiller(batch, teacher(batch.inputs))
    for key, value in fp32.items():
        assert bf16[key].dtype == torch.float32 and torch.isfinite(bf16[key]), key
        assert abs(bf16[key].item() - value.item()) <= 0.05 * abs(value.item()) + 0.02, (key, value, bf16[key])
