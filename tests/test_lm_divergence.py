"""Token-level LM divergences and the masked loss against values derived by hand on fixed 3-token vocabularies."""
import math

import pytest
import torch

from kdray.algorithms.lm.divergence import jsd
from kdray.algorithms.lm.token_loss import next_token_mask, token_distill_loss

P = [0.5, 0.25, 0.25]      # teacher
Q = [0.125, 0.375, 0.5]    # student


def kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def mix(a, b, w):
    return [w * x + (1 - w) * y for x, y in zip(a, b)]


def logits(probs):
    return torch.tensor(probs, dtype=torch.float64).log().view(1, 1, -1)


HAND = {
    "forward_kl": ({}, 0.5 * math.log(4) + 0.25 * math.log(2 / 3) + 0.25 * math.log(0.5)),
    "reverse_kl": ({}, 0.125 * math.log(0.25) + 0.375 * math.log(1.5) + 0.5 * math.log(2)),
    "total_variation": ({}, 0.5 * (0.375 + 0.125 + 0.25)),
    "jsd": ({"beta": 0.5}, 0.5 * kl(P, mix(P, Q, 0.5)) + 0.5 * kl(Q, mix(P, Q, 0.5))),
    "skew_kl": ({"alpha": 0.1}, kl(P, mix(P, Q, 0.1))),
    "skew_reverse_kl": ({"alpha": 0.1}, kl(Q, mix(Q, P, 0.1))),
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_each_divergence_matches_the_hand_value(name):
    kwargs, expected = HAND[name]
    mask = torch.ones(1, 1)
    got = token_distill_loss(logits(Q), logits(P), mask, divergence=name, **kwargs)
    assert got.item() == pytest.approx(expected, abs=1e-12)


def test_jsd_beta_zero_is_forward_kl_and_one_is_reverse_kl_as_in_trl():
    log_t, log_s = logits(P).log_softmax(-1), logits(Q).log_softmax(-1)
    assert jsd(log_t, log_s, beta=0.0).item() == pytest.approx(kl(P, Q), abs=1e-12)
    assert jsd(log_t, log_s, beta=1.0).item() == pytest.approx(kl(Q, P), abs=1e-12)
    # the paper's mixture formula itself vanishes at the ends, like beta * forward KL near 0
    small = 1e-5
    assert (jsd(log_t, log_s, beta=small) / small).item() == pytest.approx(kl(P, Q), rel=1e-3)
    assert (jsd(log_t, log_s, beta=1 - small) / small).item() == pytest.approx(kl(Q, P), rel=1e-3)


def test_temperature_softens_both_and_scales_by_t_squared():
    T = 2.0
    p_t = [math.sqrt(x) for x in P]
    p_s = [math.sqrt(x) for x in Q]
    p_t = [x / sum(p_t) for x in p_t]
    p_s = [x / sum(p_s) for x in p_s]
    got = token_distill_loss(logits(Q), logits(P), torch.ones(1, 1), temperature=T)
    assert got.item() == pytest.approx(T**2 * kl(p_t, p_s), abs=1e-12)


def test_mask_keeps_only_completion_positions_and_averages_over_them():
    student = torch.cat([logits(Q), logits(P), logits(Q)], dim=1)       # position 1: no divergence
    teacher = torch.cat([logits(P), logits(P), logits(Q)], dim=1)       # position 2: zero too; masked anyway
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    got = token_distill_loss(student, teacher, mask)
    assert got.item() == pytest.approx(kl(P, Q) / 2, abs=1e-12)
    teacher_mismatch = torch.cat([logits(P), logits(P), logits([1 / 3] * 3)], dim=1)
    assert token_distill_loss(student, teacher_mismatch, mask).item() == pytest.approx(got.item(), abs=1e-15)


def test_next_token_mask_drops_the_first_target():
    target = torch.tensor([[0, 0, 1, 1, 0]])     # prompt, prompt, completion, completion, padding
    assert next_token_mask(target).tolist() == [[0, 1, 1, 0]]


@pytest.mark.parametrize("name", sorted(HAND))
def test_gradients_reach_the_student_never_the_teacher(name):
    torch.manual_seed(0)
    student = torch.randn(2, 4, 7, requires_grad=True)
    teacher = torch.randn(2, 4, 7, requires_grad=True)
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0]])
    token_distill_loss(student, teacher, mask, divergence=name, **HAND[name][0]).backward()
    assert teacher.grad is None
    assert student.grad.abs().sum() > 0
    assert student.grad[0, 0].abs().sum() == 0 and student.grad[1, 3].abs().sum() == 0   # masked positions


def test_zero_probability_buckets_give_finite_values_and_gradients():
    """A teacher bucket of zero mass adds nothing (``0 log 0 = 0``); only reverse KL, whose student puts mass
    there, is genuinely infinite."""
    teacher = torch.tensor([[[0.0, 0.0, float("-inf")]]])
    student = torch.tensor([[[1.0, 0.0, -1.0]]], requires_grad=True)
    assert token_distill_loss(student, teacher, torch.ones(1, 1), divergence="reverse_kl").item() == math.inf
    for name, (kwargs, _) in HAND.items():
        if name == "reverse_kl":
            continue
        loss = token_distill_loss(student, teacher, torch.ones(1, 1), divergence=name, **kwargs)
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), name


def test_empty_mask_is_zero_and_still_backpropagates():
    student = torch.randn(1, 3, 5, requires_grad=True)
    loss = token_distill_loss(student, torch.randn(1, 3, 5), torch.zeros(1, 3))
    loss.backward()
    assert loss.item() == 0.0 and student.grad is not None


def test_bf16_logits_are_computed_in_fp32():
    torch.manual_seed(1)
    student, teacher = torch.randn(2, 3, 11).bfloat16(), torch.randn(2, 3, 11).bfloat16()
    got = token_distill_loss(student, teacher, torch.ones(2, 3), divergence="jsd", beta=0.3)
    expected = token_distill_loss(student.float(), teacher.float(), torch.ones(2, 3), divergence="jsd", beta=0.3)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(expected.item(), abs=1e-7)


def test_bad_input_fails_in_one_line_naming_the_cause():
    with pytest.raises(ValueError, match="unknown LM divergence 'fkl'; known: forward_kl"):
        token_distill_loss(logits(Q), logits(P), torch.ones(1, 1), divergence="fkl")
    with pytest.raises(ValueError, match=r"mask shape \(1, 2\) != logits' \(batch, length\) \(1, 1\)"):
        token_distill_loss(logits(Q), logits(P), torch.ones(1, 2))
    with pytest.raises(ValueError, match="teacher vocabulary 4 != student vocabulary 3"):
        token_distill_loss(logits(Q), logits([0.25] * 4), torch.ones(1, 1))
    with pytest.raises(ValueError, match=r"jsd beta must be in \[0, 1\]"):
        token_distill_loss(logits(Q), logits(P), torch.ones(1, 1), divergence="jsd", beta=1.5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_distill_loss(logits(Q), logits(P), torch.ones(1, 1), temperature=0)
