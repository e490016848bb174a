"""Text models by name: the feature-point contract (shapes and hand-checked values), the three ways to build
one (pretrained directory, size knobs, init from the teacher's layers), heads, save/load, one-line errors."""
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from kdray.models import create_model  # noqa: E402
from kdray.models.features import FeatureTap  # noqa: E402
from kdray.hf_local import load_tokenizer, minilm_dir  # noqa: E402
from kdray.models.text import TextModelError, text_model  # noqa: E402

TINY = dict(teacher="all_minilm_l6_v2", layers=2, hidden=32, heads=4, intermediate=64)


@pytest.fixture(scope="module")
def encoded():
    tok = load_tokenizer(minilm_dir())
    return dict(tok(["a cat sat", "the quick brown fox jumps over it"], padding=True, return_tensors="pt"))


def contract_points(n):
    return ([f"hidden_states.{i}" for i in range(n + 1)] + [f"{g}.{i}" for g in ("attentions", "queries", "keys",
                                                                                "values") for i in range(n)]
            + ["embedding"])


def test_feature_point_contract_shapes_and_values(encoded):
    torch.manual_seed(0)
    model = create_model("hf_text", 3, **TINY).eval()
    assert (model.num_layers, model.num_attention_heads, model.hidden_size) == (2, 4, 32)
    assert model.vocab_size == 30522  # from the teacher's tokenizer
    tap = FeatureTap(model, contract_points(2))
    with tap.capture() as f, torch.no_grad():
        logits = model(encoded)
    b, length = encoded["input_ids"].shape
    assert logits.shape == (2, 3)
    for i in range(3):
        assert f[f"hidden_states.{i}"].shape == (b, length, 32)
    mask = encoded["attention_mask"]
    for i in range(2):
        att = f[f"attentions.{i}"]
        assert att.shape == (b, 4, length, length)
        assert torch.allclose(att.sum(-1), torch.ones(b, 4, length), atol=1e-5)  # softmax rows
        assert float(att[0][..., mask[0] == 0].abs().max()) < 1e-6  # padded keys get no attention
        layer = model.hf.base_model.encoder.layer[i].attention.self
        h = f[f"hidden_states.{i}"]  # the layer's input: its projections are W h + b, before the head split
        assert torch.allclose(f[f"queries.{i}"], h @ layer.query.weight.T + layer.query.bias, atol=1e-5)
        assert torch.allclose(f[f"values.{i}"], h @ layer.value.weight.T + layer.value.bias, atol=1e-5)
        assert f[f"keys.{i}"].shape == (b, length, 32)
    last = f["hidden_states.2"]
    by_hand = torch.stack([last[j][mask[j] == 1].mean(0) for j in range(b)])
    assert torch.allclose(f["embedding"], by_hand, atol=1e-6)  # masked mean, padding excluded


def test_a_deep_copy_feeds_its_own_taps(encoded):
    import copy

    model = create_model("hf_text", 2, **TINY).eval()
    twin = copy.deepcopy(model)
    tap = FeatureTap(twin, ["queries.1", "keys.0"])
    with tap.capture() as f, torch.no_grad():
        twin(encoded)
    assert set(f) == {"queries.1", "keys.0"}
    assert "queries.0" in dict(model.named_modules())  # the tap keeps its contract path


def test_taps_carry_gradients_to_the_student(encoded):
    model = create_model("hf_text", 2, **TINY)
    tap = FeatureTap(model, ["hidden_states.1", "attentions.1", "queries.0"])
    with tap.capture() as f:
        model(encoded)
    (f["hidden_states.1"].sum() + f["attentions.1"].sum() + f["queries.0"].sum()).backward()
    assert model.hf.base_model.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


def test_heads_shapes(encoded):
    mlm = create_model("hf_text", 2, head="masked_lm", **TINY)
    assert mlm(encoded).shape == (*encoded["input_ids"].shape, 30522)
    emb = create_model("hf_text", 2, head="embedding", **TINY)
    assert emb(encoded).shape == (2, 32)
    with pytest.raises(TextModelError, match="allowed: classification, masked_lm, embedding"):
        create_model("hf_text", 2, head="regression", **TINY)


def test_init_from_teacher_copies_embeddings_and_the_named_layers(encoded):
    teacher = create_model("all_minilm_l6_v2", 2)
    student = create_model("hf_text", 2, teacher="all_minilm_l6_v2", init_from_teacher=[1, 4], head="embedding")
    assert student.num_layers == 2 and student.hidden_size == 384
    t, s = teacher.hf, student.hf
    assert torch.equal(s.embeddings.word_embeddings.weight, t.embeddings.word_embeddings.weight)
    assert torch.equal(s.encoder.layer[0].output.dense.weight, t.encoder.layer[1].output.dense.weight)
    assert torch.equal(s.encoder.layer[1].attention.self.key.weight, t.encoder.layer[4].attention.self.key.weight)
    assert not torch.equal(s.encoder.layer[1].attention.self.key.weight, t.encoder.layer[1].attention.self.key.weight)
    # the same first layer in both: the student's hidden state 1 is the teacher's when layer 0 is copied
    first = create_model("hf_text", 2, teacher="all_minilm_l6_v2", init_from_teacher=[0], head="embedding").eval()
    teacher.eval()
    taps = [FeatureTap(m, ["hidden_states.1"]) for m in (first, teacher)]
    with taps[0].capture() as fs, taps[1].capture() as ft, torch.no_grad():
        first(encoded), teacher(encoded)
    assert torch.allclose(fs["hidden_states.1"], ft["hidden_states.1"], atol=1e-5)


def test_bad_builds_fail_in_one_line(tmp_path):
    with pytest.raises(TextModelError, match=r"names layer\(s\) \[6\] but the teacher has layers 0..5"):
        create_model("hf_text", 2, teacher="all_minilm_l6_v2", init_from_teacher=[0, 6])
    with pytest.raises(TextModelError, match="no config.json"):
        create_model("hf_text", 2, path=str(tmp_path))
    with pytest.raises(TextModelError, match="needs the teacher's directory"):
        create_model("hf_text", 2, init_from_teacher=[0])
    with pytest.raises(TextModelError, match="multiple of heads"):
        create_model("hf_text", 2, teacher="all_minilm_l6_v2", layers=1, hidden=30, heads=4)
    with pytest.raises(TextModelError, match="drop 'hidden'"):
        create_model("hf_text", 2, teacher="all_minilm_l6_v2", init_from_teacher=[0], hidden=64)


def test_save_pretrained_round_trip(tmp_path, encoded):
    import transformers

    model = create_model("hf_text", 3, **TINY).eval()
    model.save_pretrained(tmp_path / "student")
    again = text_model(3, path=str(tmp_path / "student")).eval()
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "student")).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "student"))
    assert tok("a cat sat")["input_ids"] == load_tokenizer(minilm_dir())("a cat sat")["input_ids"]
    with torch.no_grad():
        ref = model(encoded)
        assert torch.allclose(again(encoded), ref, atol=1e-6)
        assert torch.allclose(plain(**encoded).logits, ref, atol=1e-6)


def test_import_kdray_and_image_models_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None; import kdray; from kdray.models import create_model; "
            "m = create_model('digits_mlp', 10); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-800:]
    code = ("import sys; sys.modules['transformers'] = None; from kdray.models import create_model; "
            "create_model('hf_text', 2, layers=1)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "pip install -e .[text]" in out.stderr
