"""Generation with a KV cache: the cached forward equals the full one, and cached sampling gives the very tokens
of uncached sampling (greedy and at a temperature, same generator) for kdray's TinyCausalLM and for
transformers causal LMs, while feeding each token to the model once."""
import pytest
import torch
import torch.nn as nn

from kdray.algorithms.lm.generation import incremental_decoder, sample_completions
from kdray.models.causal_lm import tiny_causal_lm

V, L = 40, 18


def packed_batch():
    """Rows whose completions start and end at different positions, with prompt and padding around them."""
    ids = torch.randint(0, V, (3, L), generator=torch.Generator().manual_seed(0))
    completion = torch.zeros(3, L)
    completion[0, 3:] = 1
    completion[1, 6:11] = 1      # then padding
    completion[2, 1:16] = 1
    return ids, completion


def tokens_fed(model: nn.Module) -> list[int]:
    """The length of every input the model's forward sees."""
    lengths = []
    model.register_forward_pre_hook(lambda m, args, kwargs: lengths.append(
        (args[0] if args else kwargs["input_ids"]).shape[1]), with_kwargs=True)
    return lengths


def assert_cached_equals_uncached(model: nn.Module):
    ids, completion = packed_batch()
    for temperature in (0.0, 1.0, 0.7):
        g_cached, g_plain = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        cached = sample_completions(model, ids, completion, temperature, g_cached, use_cache=True)
        plain = sample_completions(model, ids, completion, temperature, g_plain, use_cache=False)
        assert torch.equal(cached, plain), temperature
        assert torch.equal(g_cached.get_state(), g_plain.get_state())   # the same draws were made
        keep = completion.bool()
        assert torch.equal(cached[~keep], ids[~keep])
        assert (cached[keep] != ids[keep]).float().mean() > 0.5          # new tokens were written


def test_tiny_cached_forward_in_pieces_equals_the_full_forward():
    model = tiny_causal_lm(V, layers=2, width=16, heads=2, max_length=L, seed=0).eval()
    ids, _ = packed_batch()
    cache = model.new_kv_cache()
    pieces = [model(ids[:, a:b], cache=cache) for a, b in ((0, 5), (5, 6), (6, 11), (11, L))]
    torch.testing.assert_close(torch.cat(pieces, 1), model(ids), rtol=0, atol=1e-5)
    assert cache.length == L and len(cache.keys) == 2 and cache.keys[0].shape == (3, 2, L, 8)
    with pytest.raises(ValueError, match=f"sequence length {L + 1} > max_length {L}"):
        model(ids[:, :1], cache=cache)


def test_tiny_cached_sampling_equals_uncached_and_feeds_each_token_once():
    model = tiny_causal_lm(V, layers=2, width=16, heads=2, max_length=L, seed=1)
    assert_cached_equals_uncached(model)
    assert model.training                                        # mode restored
    lengths = tokens_fed(model)
    ids, completion = packed_batch()
    sample_completions(model, ids, completion, 1.0, torch.Generator().manual_seed(0))
    positions = completion.bool().any(0).nonzero().flatten().tolist()   # 1..17
    assert sum(lengths) == positions[-1] and lengths[0] == positions[0] and set(lengths[1:]) == {1}
    lengths.clear()
    sample_completions(model, ids, completion, 1.0, torch.Generator().manual_seed(0), use_cache=False)
    assert lengths == positions                                  # the whole prefix, every step


def test_a_model_without_a_cache_still_samples_the_same_tokens():
    class Wrapped(nn.Module):   # e.g. a DDP wrapper: forward only, no new_kv_cache
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return self.inner(input_ids)

    inner = tiny_causal_lm(V, layers=1, width=16, heads=2, max_length=L, seed=2)
    assert incremental_decoder(Wrapped(inner)) is None
    ids, completion = packed_batch()
    wrapped = sample_completions(Wrapped(inner), ids, completion, 1.0, torch.Generator().manual_seed(1))
    direct = sample_completions(inner, ids, completion, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(wrapped, direct)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_cached_sampling_equals_uncached(arch):
    pytest.importorskip("transformers")
    from kdray.models.hf_causal import random_causal_lm

    model = random_causal_lm(arch, layers=2, hidden=32, heads=2, vocab_size=V, max_length=32, seed=3)
    assert_cached_equals_uncached(model)
    lengths = tokens_fed(model)
    ids, completion = packed_batch()
    sample_completions(model, ids, completion, 0.0)
    assert sum(lengths) == L - 1                                  # up to the last completion position, once


def test_bare_transformers_model_uses_its_own_cache():
    pytest.importorskip("transformers")
    from kdray.models.hf_causal import random_causal_lm

    bare = random_causal_lm("qwen2", layers=2, hidden=32, heads=4, kv_heads=2, vocab_size=V, max_length=32,
                            seed=4).hf
    assert incremental_decoder(bare) is not None
    assert_cached_equals_uncached(bare)
