"""The tiny causal LM used by the LM tests and benches is causal, seeded, and refuses over-long inputs."""
import pytest
import torch

from kdray.models.causal_lm import tiny_causal_lm


def test_future_tokens_do_not_change_earlier_logits():
    model = tiny_causal_lm(20, layers=2, width=16, heads=2, max_length=12, seed=0)
    ids = torch.randint(0, 20, (2, 10), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 20
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=1e-6)
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-3


def test_seeded_weights_and_global_rng_untouched():
    state = torch.random.get_rng_state()
    a, b = tiny_causal_lm(20, seed=3), tiny_causal_lm(20, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    with pytest.raises(ValueError, match="sequence length 9 > max_length 8"):
        tiny_causal_lm(20, max_length=8)(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="width 30 must be a multiple of heads 4"):
        tiny_causal_lm(20, width=30, heads=4)
