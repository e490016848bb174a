"""Per-token multi-teacher combination for LMs against hand-derived distributions, and the vocabulary check."""
import math

import pytest
import torch

from kdray.algorithms.lm.multi_teacher import combine_teacher_logits
from kdray.algorithms.lm.token_loss import token_distill_loss


def logits(*rows):
    return torch.tensor(rows, dtype=torch.float64).log().unsqueeze(0)   # (1, positions, V)


def normalise(p):
    return [x / sum(p) for x in p]


P1, P2 = [0.5, 0.25, 0.25], [0.25, 0.25, 0.5]
PEAKED, FLAT = [0.9, 0.05, 0.05], [1 / 3, 1 / 3, 1 / 3]


def test_mean_is_the_normalised_geometric_mean():
    combined, w = combine_teacher_logits([logits(P1), logits(P2)])
    expected = normalise([math.sqrt(a * b) for a, b in zip(P1, P2)])
    assert combined.softmax(-1)[0, 0].tolist() == pytest.approx(expected, abs=1e-12)
    assert w.tolist() == [0.5, 0.5]


def test_fixed_weights_are_normalised():
    combined, w = combine_teacher_logits([logits(P1), logits(P2)], "weights", weights=[3.0, 1.0])
    expected = normalise([a**0.75 * b**0.25 for a, b in zip(P1, P2)])
    assert combined.softmax(-1)[0, 0].tolist() == pytest.approx(expected, abs=1e-12)
    assert w.tolist() == [0.75, 0.25]


def test_confidence_weights_each_token_by_the_teachers_entropies():
    """Position 0: teacher 0 is peaked; position 1: teacher 1 is. Weights softmax(-H) per position."""
    t0, t1 = logits(PEAKED, FLAT), logits(FLAT, PEAKED)
    combined, _ = combine_teacher_logits([t0, t1], "confidence")

    def entropy(p):
        return -sum(x * math.log(x) for x in p)

    w_peaked = 1 / (1 + math.exp(entropy(PEAKED) - entropy(FLAT)))   # softmax(-H) for the peaked teacher
    assert w_peaked > 0.65      # the more certain teacher leads at each position
    for position, (first, second) in enumerate([(PEAKED, FLAT), (FLAT, PEAKED)]):
        w_first = w_peaked if position == 0 else 1 - w_peaked
        expected = normalise([a**w_first * b**(1 - w_first) for a, b in zip(first, second)])
        assert combined.softmax(-1)[0, position].tolist() == pytest.approx(expected, abs=1e-12)


def test_the_combination_feeds_the_token_loss():
    combined, _ = combine_teacher_logits([logits(P1), logits(P2)])
    student = logits([1 / 3] * 3).requires_grad_()
    loss = token_distill_loss(student, combined, torch.ones(1, 1))
    target = normalise([math.sqrt(a * b) for a, b in zip(P1, P2)])
    assert loss.item() == pytest.approx(sum(t * math.log(t * 3) for t in target), abs=1e-12)


def test_a_vocabulary_mismatch_fails_in_one_line_naming_both_sizes():
    t0, t1 = torch.randn(2, 4, 50), torch.randn(2, 4, 48)
    with pytest.raises(ValueError, match=r"^teacher 1 has a vocabulary of 48 tokens but teacher 0's has 50: LM "
                                         r"teachers must share the student's tokenizer"):
        combine_teacher_logits([t0, t1])
    with pytest.raises(ValueError, match="teacher 0 has a vocabulary of 50 tokens but the student's has 49"):
        combine_teacher_logits([t0, t0], student_vocab_size=49)
    with pytest.raises(ValueError, match=r"combine 'weights' needs 2 weights, got \[1.0\]"):
        combine_teacher_logits([t0, t0], "weights", weights=[1.0])
