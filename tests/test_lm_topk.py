"""Top-k distillation with an explicit rest bucket: hand values on a 4-token vocabulary, equality with the
full vocabulary at k = V and k = V - 1, never above it for smaller k, and the rest bucket's gradient."""
import math

import pytest
import torch

from kdray.algorithms.lm.token_loss import token_distill_loss
from kdray.algorithms.lm.topk import chunked_topk_distill_loss, teacher_topk, topk_distill_loss

KWARGS = {"forward_kl": {}, "reverse_kl": {}, "jsd": {"beta": 0.3}, "total_variation": {}, "skew_kl": {"alpha": 0.1},
          "skew_reverse_kl": {"alpha": 0.1}}


def logits(probs):
    return torch.tensor(probs, dtype=torch.float64).log().view(1, 1, -1)


def test_rest_bucket_by_hand():
    """Teacher [.4, .3, .2, .1], student [.1, .2, .3, .4], k = 2: buckets [.4, .3, rest .3] vs [.1, .2, rest .7]."""
    topk = teacher_topk(logits([0.4, 0.3, 0.2, 0.1]), k=2)
    assert topk.indices.tolist() == [[[0, 1]]]
    student = logits([0.1, 0.2, 0.3, 0.4])
    mask = torch.ones(1, 1)
    fkl = 0.4 * math.log(4) + 0.3 * math.log(1.5) + 0.3 * math.log(0.3 / 0.7)
    rkl = 0.1 * math.log(0.25) + 0.2 * math.log(2 / 3) + 0.7 * math.log(0.7 / 0.3)
    assert topk_distill_loss(student, topk, mask).item() == pytest.approx(fkl, abs=1e-6)
    assert topk_distill_loss(student, topk, mask, divergence="reverse_kl").item() == pytest.approx(rkl, abs=1e-6)
    tv = 0.5 * (0.3 + 0.1 + 0.4)
    assert topk_distill_loss(student, topk, mask, divergence="total_variation").item() == pytest.approx(tv, abs=1e-6)


@pytest.mark.parametrize("name", sorted(KWARGS))
def test_k_equal_to_v_and_v_minus_one_equal_the_full_vocabulary(name):
    torch.manual_seed(0)
    V = 9
    teacher = torch.randn(2, 5, V)
    mask = (torch.rand(2, 5) > 0.2).float()
    for k in (V, V - 1):
        student = torch.randn(2, 5, V, generator=torch.Generator().manual_seed(1), requires_grad=True)
        full = token_distill_loss(student, teacher, mask, divergence=name, temperature=2.0, **KWARGS[name])
        (grad_full,) = torch.autograd.grad(full, student)
        topk = teacher_topk(teacher, k, temperature=2.0)
        loss = topk_distill_loss(student, topk, mask, divergence=name, **KWARGS[name])
        (grad,) = torch.autograd.grad(loss, student)
        assert loss.item() == pytest.approx(full.item(), rel=1e-5, abs=1e-6), k
        torch.testing.assert_close(grad, grad_full, rtol=1e-4, atol=1e-6)


def test_the_exact_rest_is_the_teacher_s_mass_outside_its_top_k_and_the_chunked_loss_uses_it():
    """With a rest of ~1e-9 the fp32 ``1 - sum(top-k)`` reads 0 (floored at 1e-38); the exact rest is the mass
    the full softmax puts outside the top-k, and the chunked loss equals the unchunked one with it."""
    teacher = torch.zeros(1, 4, 6)
    teacher[..., :5] = 25.0  # the sixth token's probability: exp(-25) / 5 ~ 2.8e-12
    topk = teacher_topk(teacher, 5, exact_rest=True)
    expected = teacher.log_softmax(-1)[..., 5:]
    torch.testing.assert_close(topk.rest_logprobs, expected)
    assert teacher_topk(teacher, 5).rest_logprobs is None  # the cache's view: the rest left to 1 - sum(top-k)
    assert teacher_topk(teacher, 6, exact_rest=True).rest_logprobs is None  # k = V: no rest bucket
    student, mask = torch.randn(1, 4, 6, generator=torch.Generator().manual_seed(0)), torch.ones(1, 4)
    whole = topk_distill_loss(student, topk, mask, divergence="reverse_kl")
    chunked = chunked_topk_distill_loss(student, topk, mask, divergence="reverse_kl", chunk_size=3)
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-6)
    assert whole.item() < topk_distill_loss(student, teacher_topk(teacher, 5), mask, divergence="reverse_kl").item()


@pytest.mark.parametrize("name", sorted(KWARGS))
def test_merging_the_tail_never_exceeds_the_full_vocabulary_loss(name):
    """Every divergence here is an f-divergence: merging buckets cannot increase it (data processing). The
    merge is exact with the exact rest mass (``exact_rest``); ``1 - sum(top-k)`` in fp32 is not a merge when
    the rest is ~1e-8 (teacher logits x 3), and broke the inequality by 7e-4 for reverse KL on some CPUs'
    draws of these logits."""
    torch.manual_seed(2)
    student, teacher = torch.randn(3, 6, 20), torch.randn(3, 6, 20) * 3
    mask = torch.ones(3, 6)
    full = token_distill_loss(student, teacher, mask, divergence=name, **KWARGS[name])
    previous = 0.0
    for k in (1, 3, 10, 19):
        loss = topk_distill_loss(student, teacher_topk(teacher, k, exact_rest=True), mask, divergence=name,
                                 **KWARGS[name]).item()
        assert loss <= full.item() + 1e-6
        assert loss >= previous - 1e-6      # finer buckets, larger divergence
        previous = loss


def test_rest_bucket_gives_gradient_to_tokens_outside_the_teacher_top_k():
    torch.manual_seed(3)
    teacher = torch.randn(1, 1, 10)
    student = torch.randn(1, 1, 10, requires_grad=True)
    topk = teacher_topk(teacher, 3)
    topk_distill_loss(student, topk, torch.ones(1, 1)).backward()
    outside = torch.ones(10, dtype=torch.bool)
    outside[topk.indices.flatten()] = False
    assert student.grad[0, 0, outside].abs().min() > 0


def test_float16_values_round_as_the_cache_does_and_stay_close():
    torch.manual_seed(4)
    teacher, student = torch.randn(2, 4, 30), torch.randn(2, 4, 30)
    mask = torch.ones(2, 4)
    exact = topk_distill_loss(student, teacher_topk(teacher, 5), mask).item()
    rounded = teacher_topk(teacher, 5, value_dtype=torch.float16)
    assert torch.equal(rounded.logprobs, rounded.logprobs.half().float())
    assert topk_distill_loss(student, rounded, mask).item() == pytest.approx(exact, rel=2e-3)


def test_chunked_topk_equals_unchunked():
    torch.manual_seed(5)
    head = torch.nn.Linear(6, 40)
    hidden = torch.randn(2, 11, 6, requires_grad=True)
    topk = teacher_topk(torch.randn(2, 11, 40), 7, temperature=1.5)
    mask = (torch.rand(2, 11) > 0.3).float()
    full = topk_distill_loss(head(hidden), topk, mask, divergence="jsd", beta=0.5)
    (g_full,) = torch.autograd.grad(full, hidden)
    chunked = chunked_topk_distill_loss(hidden, topk, mask, divergence="jsd", beta=0.5, chunk_size=4,
                                        student_head=head)
    (g,) = torch.autograd.grad(chunked, hidden)
    assert chunked.item() == pytest.approx(full.item(), rel=1e-5)
    torch.testing.assert_close(g, g_full, rtol=1e-5, atol=1e-7)


def test_bad_input_fails_in_one_line():
    topk = teacher_topk(torch.randn(1, 2, 8), 3, temperature=1.0)
    with pytest.raises(ValueError, match="taken at temperature 1.0 but the loss asks for 2.0"):
        topk_distill_loss(torch.randn(1, 2, 8), topk, torch.ones(1, 2), temperature=2.0)
    with pytest.raises(ValueError, match="teacher vocabulary 8 != student vocabulary 9"):
        topk_distill_loss(torch.randn(1, 2, 9), topk, torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"k must be in \[1, vocabulary size 8\], got 9"):
        teacher_topk(torch.randn(1, 2, 8), 9)
