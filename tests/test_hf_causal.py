"""transformers causal LMs as kdray LM teachers and students: built from size knobs (seeded, exact parameter
counts), saved and reloaded from a local directory with equal logits, hidden states + LM head for the chunked
losses, the LM losses and one optimiser step on an HF pair, and one-line vocabulary / tokenizer mismatch errors."""
import pytest
import torch

pytest.importorskip("transformers")

from kdray.algorithms.lm.chunked import chunked_token_distill_loss  # noqa: E402
from kdray.algorithms.lm.generation import sample_completions  # noqa: E402
from kdray.algorithms.lm.on_policy import OnPolicySource  # noqa: E402
from kdray.algorithms.lm.step import LMLossSettings, lm_step_losses  # noqa: E402
from kdray.algorithms.lm.token_loss import next_token_mask, token_distill_loss  # noqa: E402
from kdray.algorithms.lm.vocabulary import check_shared_vocabulary  # noqa: E402
from kdray.models import create_model, model_family  # noqa: E402
from kdray.models.causal_lm import tiny_causal_lm  # noqa: E402
from kdray.models.hf_causal import CausalLMError, HFCausalLM  # noqa: E402

V, L = 100, 12
TINY = dict(layers=2, hidden=32, heads=2, max_length=32)


def lm(arch="llama", seed=0, **knobs):
    return create_model("hf_causal_lm", num_classes=V, arch=arch, seed=seed, **{**TINY, **knobs})


def batch():
    ids = torch.randint(0, V, (4, L), generator=torch.Generator().manual_seed(0))
    completion = torch.zeros(4, L)
    completion[:, 4:] = 1
    completion[1, 9:] = 0
    return ids, completion


def llama_params(vocab, layers, hidden, intermediate):
    """Embedding + per layer (q, k, v, o; gate, up, down; two RMSNorms) + final norm + untied head."""
    return vocab * hidden + layers * (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden) + hidden \
        + hidden * vocab


def test_size_knobs_shape_the_model_and_the_seed_its_weights():
    assert model_family("hf_causal_lm") == "lm"
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    base = lm()
    assert isinstance(base, HFCausalLM) and type(base.hf).__name__ == "LlamaForCausalLM"
    assert count(base) == llama_params(V, 2, 32, 128) == 39328
    assert count(lm(layers=3)) == llama_params(V, 3, 32, 128)
    assert count(lm(hidden=64)) == llama_params(V, 2, 64, 256)
    assert (base.vocab_size, base.max_length, base.num_layers, base.hidden_size) == (V, 32, 2, 32)
    gpt2 = lm("gpt2")
    assert type(gpt2.hf).__name__ == "GPT2LMHeadModel" and gpt2.lm_head.weight is gpt2.hf.transformer.wte.weight
    assert type(lm("qwen2", heads=4, kv_heads=2).hf).__name__ == "Qwen2ForCausalLM"
    state = torch.random.get_rng_state()
    again, other = lm(seed=0), lm(seed=1)
    assert torch.equal(state, torch.random.get_rng_state())
    assert all(torch.equal(a, b) for a, b in zip(base.parameters(), again.parameters()))
    assert not torch.equal(base.lm_head.weight, other.lm_head.weight)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_save_pretrained_and_reload_from_the_directory_gives_equal_logits(arch, tmp_path):
    model = lm(arch, seed=2).eval()
    ids, _ = batch()
    model.save_pretrained(tmp_path / "lm")
    loaded = create_model("hf_causal_lm", num_classes=V, path=str(tmp_path / "lm")).eval()
    torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    half = create_model("hf_causal_lm", num_classes=V, path=str(tmp_path / "lm"), dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_hidden_states_and_lm_head_feed_the_chunked_loss():
    student, teacher = lm("gpt2", seed=3), lm("llama", seed=4).eval()
    ids, completion = batch()
    torch.testing.assert_close(student.lm_head(student.hidden_states(ids)), student(ids), rtol=0, atol=1e-6)
    mask = next_token_mask(completion)
    full = token_distill_loss(student(ids)[:, :-1], teacher(ids)[:, :-1].detach(), mask, "jsd", beta=0.3)
    chunked = chunked_token_distill_loss(student.hidden_states(ids)[:, :-1], teacher.hidden_states(ids)[:, :-1],
                                         mask, "jsd", chunk_size=4, student_head=student.lm_head,
                                         teacher_head=teacher.lm_head, beta=0.3)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd", "ce"])
def test_lm_step_on_an_hf_pair_and_one_step_lowers_the_loss(loss):
    teacher, student = lm("llama", seed=5, layers=3).eval(), lm("gpt2", seed=6)
    ids, completion = batch()
    settings = LMLossSettings(loss=loss, beta=0.5)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses, source = lm_step_losses(student, ids, completion, settings, teachers=[teacher])
    before = losses[f"lm_{loss}"]
    assert source.source == "corpus" and before.item() > 0
    before.backward()
    assert all(p.grad is None for p in teacher.parameters())
    optimizer.step()
    after = lm_step_losses(student, ids, completion, settings, teachers=[teacher])[0][f"lm_{loss}"]
    assert after.item() < before.item() * 0.98


def test_lm_step_top_k_and_two_hf_teachers_run():
    teachers = [lm("llama", seed=7).eval(), lm("qwen2", seed=8).eval()]
    student = lm("gpt2", seed=9)
    ids, completion = batch()
    for settings in (LMLossSettings(top_k=8), LMLossSettings(combine="confidence"),
                     LMLossSettings(chunk_tokens=4, top_k=8)):
        losses, _ = lm_step_losses(student, ids, completion, settings, teachers=teachers)
        assert torch.isfinite(losses["lm_forward_kl"]) and losses["lm_forward_kl"].item() > 0


def test_on_policy_step_on_an_hf_pair_trains_on_the_student_s_cached_samples():
    teacher, student = lm("llama", seed=10).eval(), lm("gpt2", seed=11)
    ids, completion = batch()
    source = OnPolicySource(lam=1.0, temperature=1.0, seed=3)
    losses, drawn = lm_step_losses(student, ids, completion, LMLossSettings(loss="jsd"), teachers=[teacher],
                                   source=source)
    g = torch.Generator().manual_seed(3)
    torch.rand((), generator=g)                                   # the source's lambda draw
    expected = sample_completions(student, ids, completion, 1.0, g, use_cache=False)
    assert drawn.source == "student" and torch.equal(drawn.input_ids, expected)
    assert (expected[completion.bool()] != ids[completion.bool()]).float().mean() > 0.5
    assert student.training and losses["lm_jsd"].requires_grad


def word_tokenizer(directory, words):
    """A tiny word-level tokenizer saved with save_pretrained (no download)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(str(directory))
    return str(directory)


def test_vocabulary_mismatch_fails_in_one_line_naming_both(tmp_path):
    student = lm("gpt2", seed=1)
    bigger = create_model("hf_causal_lm", num_classes=120, arch="llama", seed=2, **TINY)
    with pytest.raises(ValueError) as err:
        check_shared_vocabulary(student, [lm(seed=3), bigger])
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("LM teacher 1 vocabulary (120 tokens) != student vocabulary (100 tokens)")
    assert "teachers must share the student's tokenizer" in message
    with pytest.raises(ValueError, match=r"LM teacher vocabulary \(120 tokens\) != student vocabulary \(40 tokens"):
        check_shared_vocabulary(tiny_causal_lm(40), [bigger])
    with pytest.raises(ValueError, match="LM teacher vocabulary 120 != student vocabulary 100"):
        lm_step_losses(student, *batch(), LMLossSettings(), teachers=[bigger.eval()])
    check_shared_vocabulary(student, [lm(seed=3), lm("qwen2", seed=4)])   # one vocabulary: no error

    words = ["[UNK]", *(f"w{i}" for i in range(V - 1))]
    ours = word_tokenizer(tmp_path / "ours", words)
    shuffled = word_tokenizer(tmp_path / "theirs", [words[0], *reversed(words[1:])])
    s = create_model("hf_causal_lm", num_classes=None, arch="gpt2", tokenizer=ours, **TINY)
    t = create_model("hf_causal_lm", num_classes=None, arch="llama", tokenizer=shuffled, **TINY)
    assert s.vocab_size == t.vocab_size == V
    with pytest.raises(ValueError) as err:
        check_shared_vocabulary(s, [t])
    assert str(err.value).startswith(f"LM teacher tokenizer ({shuffled}) maps tokens to other ids than the "
                                     f"student's ({ours}), both {V} tokens")
    s.save_pretrained(tmp_path / "student")          # the tokenizer travels with the weights
    reloaded = create_model("hf_causal_lm", num_classes=None, path=str(tmp_path / "student"))
    assert reloaded.tokenizer_dir == str(tmp_path / "student")
    assert reloaded.tokenizer().get_vocab() == s.tokenizer().get_vocab()
    check_shared_vocabulary(reloaded, [s])


@pytest.mark.parametrize("knobs, message", [
    (dict(path="/nonexistent/lm"), "causal LM path '/nonexistent/lm' is not a local model directory"),
    (dict(path="/x", layers=2), "a causal LM from 'path' takes no size knobs (got layers"),
    (dict(arch="mamba", vocab_size=V), "causal LM arch 'mamba': allowed gpt2, llama, qwen2"),
    (dict(vocab_size=V, dtype="fp8"), "causal LM dtype 'fp8': allowed float32, bfloat16, float16"),
    (dict(vocab_size=V, hidden=30, heads=4), "causal LM hidden (30) must be a multiple of heads (4)"),
    (dict(vocab_size=V, heads=4, kv_heads=3), "causal LM heads (4) must be a multiple of kv_heads (3)"),
    (dict(), "a new causal LM needs its vocabulary size: give vocab_size"),
])
def test_bad_knobs_fail_in_one_line(knobs, message):
    with pytest.raises(CausalLMError) as err:
        create_model("hf_causal_lm", num_classes=None, **knobs)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    with pytest.raises(CausalLMError, match="vocab_size 50 != num_classes 100"):
        create_model("hf_causal_lm", num_classes=100, vocab_size=50)
    with pytest.raises(ValueError, match="sequence length 33 > max_length 32"):
        lm()(torch.zeros(1, 33, dtype=torch.long))
