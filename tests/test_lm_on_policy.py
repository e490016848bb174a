"""On-policy batches (GKD's lambda): the tokens a step's loss sees are the student's samples (or the teacher's
with seq_kd), never the corpus's, and the student-generated fraction is lambda."""
import pytest
import torch

from kdray.algorithms.lm.generation import sample_completions
from kdray.algorithms.lm.on_policy import OnPolicySource, on_policy_distill_loss
from kdray.algorithms.lm.token_loss import next_token_mask, token_distill_loss
from kdray.models.causal_lm import tiny_causal_lm

V, L = 30, 10


def setup():
    student = tiny_causal_lm(V, layers=1, width=16, heads=2, max_length=16, seed=1)
    teacher = tiny_causal_lm(V, layers=1, width=32, heads=2, max_length=16, seed=2)
    ids = torch.randint(0, V, (3, L), generator=torch.Generator().manual_seed(0))
    completion = torch.zeros(3, L)
    completion[0, 3:] = 1
    completion[1, 5:8] = 1      # then two padding positions
    completion[2, 2:9] = 1
    return student, teacher, ids, completion


def full_length_inputs(model, length):
    """Record the token ids of every forward over a whole sequence (generation's forwards are shorter)."""
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()) if args[0].shape[1] == length
                                    else None)
    return seen


def test_student_generated_tokens_not_corpus_tokens_feed_the_step_loss():
    student, teacher, ids, completion = setup()
    seen_by_student, seen_by_teacher = full_length_inputs(student, L), full_length_inputs(teacher, L)
    source = OnPolicySource(lam=1.0, temperature=1.0, seed=7)
    loss, batch = on_policy_distill_loss(student, teacher, ids, completion, source, divergence="jsd", beta=0.5)

    g = torch.Generator().manual_seed(7)
    torch.rand((), generator=g)                      # the source's lambda draw
    expected = sample_completions(student, ids, completion, 1.0, g)
    assert batch.source == "student"
    assert len(seen_by_student) == 1 and torch.equal(seen_by_student[0], expected)
    assert len(seen_by_teacher) == 1 and torch.equal(seen_by_teacher[0], expected)
    keep = completion.bool()
    assert torch.equal(expected[~keep], ids[~keep])                  # prompts and padding untouched
    assert (expected[keep] != ids[keep]).float().mean() > 0.5        # the completions are new tokens
    mask = next_token_mask(completion)
    with torch.no_grad():
        on_generated = token_distill_loss(student(expected)[:, :-1], teacher(expected)[:, :-1], mask, "jsd", beta=0.5)
        on_corpus = token_distill_loss(student(ids)[:, :-1], teacher(ids)[:, :-1], mask, "jsd", beta=0.5)
    assert loss.item() == pytest.approx(on_generated.item(), rel=1e-6)
    assert abs(loss.item() - on_corpus.item()) > 1e-3
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.lm_head.weight.grad.abs().sum() > 0


def test_seq_kd_trains_on_the_teacher_greedy_continuation():
    student, teacher, ids, completion = setup()
    seen = full_length_inputs(student, L)
    source = OnPolicySource(lam=0.0, seq_kd=True, temperature=0.0)
    _, batch = on_policy_distill_loss(student, teacher, ids, completion, source)
    assert batch.source == "teacher" and torch.equal(seen[0], batch.input_ids)
    with torch.no_grad():
        argmax = teacher(batch.input_ids).argmax(-1)
    keep = completion.bool()
    # each completion token is the teacher's most likely next token after the tokens before it
    assert torch.equal(batch.input_ids[:, 1:][keep[:, 1:]], argmax[:, :-1][keep[:, 1:]])
    assert torch.equal(batch.input_ids[~keep], ids[~keep])


def test_lambda_zero_without_seq_kd_keeps_the_corpus():
    student, teacher, ids, completion = setup()
    _, batch = on_policy_distill_loss(student, teacher, ids, completion, OnPolicySource(lam=0.0))
    assert batch.source == "corpus" and batch.input_ids is ids


def test_the_student_generated_fraction_is_lambda():
    student, teacher, ids, _ = setup()
    one_token = torch.zeros(3, L)
    one_token[:, 2] = 1         # one generated position keeps each draw cheap
    source = OnPolicySource(lam=0.3, seed=11)
    draws = [source.draw(student, teacher, ids[:, :3], one_token[:, :3]).source for _ in range(400)]
    # 400 Bernoulli(0.3) draws: mean 120, sd 9.2; 3 sd either side
    assert 92 <= draws.count("student") <= 148 and set(draws) == {"student", "corpus"}


def test_bad_settings_fail_in_one_line():
    student, _, ids, completion = setup()
    with pytest.raises(ValueError, match=r"on-policy lam \(GKD's lambda, the student-generated fraction\) must "
                                         r"be in \[0, 1\], got 1.5"):
        OnPolicySource(lam=1.5)
    completion[0, 0] = 1
    with pytest.raises(ValueError, match="a completion cannot start at position 0"):
        sample_completions(student, ids, completion)
