"""Chunking the token loss over the sequence changes neither its value nor its gradients, and it bounds what
autograd keeps for backward."""
import pytest
import torch
import torch.nn as nn

from kdray.algorithms.lm.chunked import chunked_token_distill_loss
from kdray.algorithms.lm.token_loss import token_distill_loss

B, L, H, V = 2, 12, 8, 50
KWARGS = {"forward_kl": {}, "reverse_kl": {}, "jsd": {"beta": 0.3}, "total_variation": {}, "skew_kl": {"alpha": 0.1}}


def setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    head_s, head_t = nn.Linear(H, V), nn.Linear(H, V)
    hidden_s = torch.randn(B, L, H, generator=g, requires_grad=True)
    hidden_t = torch.randn(B, L, H, generator=g)
    mask = (torch.rand(B, L, generator=g) > 0.3).float()
    mask[:, :3] = 0     # a prompt
    return head_s, head_t, hidden_s, hidden_t, mask


@pytest.mark.parametrize("name", sorted(KWARGS))
@pytest.mark.parametrize("chunk_size", [1, 5, L])
def test_chunked_equals_unchunked_loss_and_gradients(name, chunk_size):
    head_s, head_t, hidden_s, hidden_t, mask = setup()
    full = token_distill_loss(head_s(hidden_s), head_t(hidden_t), mask, divergence=name, temperature=2.0,
                              **KWARGS[name])
    grads_full = torch.autograd.grad(full, [hidden_s, head_s.weight])
    chunked = chunked_token_distill_loss(hidden_s, hidden_t, mask, divergence=name, temperature=2.0,
                                         chunk_size=chunk_size, student_head=head_s, teacher_head=head_t,
                                         **KWARGS[name])
    grads_chunked = torch.autograd.grad(chunked, [hidden_s, head_s.weight])
    assert chunked.item() == pytest.approx(full.item(), rel=1e-5)
    for a, b in zip(grads_full, grads_chunked):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    assert head_t.weight.grad is None


def test_chunked_over_logits_equals_unchunked():
    head_s, head_t, hidden_s, hidden_t, mask = setup(1)
    s, t = head_s(hidden_s), head_t(hidden_t)
    full = token_distill_loss(s, t, mask)
    assert chunked_token_distill_loss(s, t, mask, chunk_size=4).item() == pytest.approx(full.item(), rel=1e-6)


def saved_bytes(fn):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def test_chunking_keeps_far_less_for_backward_than_full_logits():
    """Unchunked, autograd keeps (B, L, V) tensors; chunked, only hidden-state chunks (the recomputed
    region's tensors are never kept). With V = 50 >> H = 8 that is more than 10x less."""
    head_s, head_t, hidden_s, hidden_t, mask = setup()
    full = saved_bytes(lambda: token_distill_loss(head_s(hidden_s), head_t(hidden_t), mask))
    chunked = saved_bytes(lambda: chunked_token_distill_loss(hidden_s, hidden_t, mask, chunk_size=3,
                                                             student_head=head_s, teacher_head=head_t))
    assert full >= B * L * V * 4
    assert chunked * 10 < full, (chunked, full)


def test_all_masked_is_zero_with_a_graph_and_bad_chunk_fails():
    head_s, head_t, hidden_s, hidden_t, mask = setup()
    loss = chunked_token_distill_loss(hidden_s, hidden_t, torch.zeros(B, L), student_head=head_s,
                                      teacher_head=head_t)
    loss.backward()
    assert loss.item() == 0.0
    with pytest.raises(ValueError, match="chunk_size must be >= 1 position, got 0"):
        chunked_token_distill_loss(hidden_s, hidden_t, mask, chunk_size=0, student_head=head_s, teacher_head=head_t)
