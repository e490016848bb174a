"""kdray.algorithms.lm.step: one LM step's named loss from its settings, checked against values computed here by
hand from the models' logits (softmax sums written out), and the held-out figures."""
from __future__ import annotations

import math

import pytest
import torch

from kdray.algorithms.lm.on_policy import OnPolicySource
from kdray.algorithms.lm.step import LMLossSettings, held_out_figures, lm_step_losses
from kdray.algorithms.lm.topk import teacher_topk
from kdray.models.causal_lm import tiny_causal_lm

V, L, B = 11, 8, 3


@pytest.fixture
def parts():
    torch.manual_seed(0)
    student = tiny_causal_lm(V, layers=1, width=16, heads=2, max_length=L, seed=1)
    teachers = [tiny_causal_lm(V, layers=1, width=16, heads=2, max_length=L, seed=s).eval() for s in (2, 3)]
    ids = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(B, L)
    mask[:, :3] = 0          # a 3-token prompt: only the completion's targets count
    mask[2, -2:] = 0         # and padding at the end of row 2
    return student, teachers, ids, mask


def kept(mask):
    return mask[:, 1:].bool()


def test_ce_is_the_mean_negative_log_likelihood_of_the_kept_targets(parts):
    student, _, ids, mask = parts
    losses, batch = lm_step_losses(student, ids, mask, LMLossSettings(loss="ce"))
    logp = student(ids)[:, :-1].log_softmax(-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert batch.source == "corpus" and list(losses) == ["lm_ce"]
    torch.testing.assert_close(losses["lm_ce"], nll[kept(mask)].mean())


def test_forward_kl_at_temperature_matches_the_written_out_sum(parts):
    student, teachers, ids, mask = parts
    T = 2.0
    losses, _ = lm_step_losses(student, ids, mask, LMLossSettings(loss="forward_kl", temperature=T), teachers[:1])
    p = (teachers[0](ids)[:, :-1] / T).softmax(-1)
    q = (student(ids)[:, :-1] / T).softmax(-1)
    kl = (p * (p.log() - q.log())).sum(-1)
    torch.testing.assert_close(losses["lm_forward_kl"], kl[kept(mask)].mean() * T**2, rtol=1e-5, atol=1e-6)


def test_two_teachers_mean_teach_the_normalised_geometric_mean(parts):
    student, teachers, ids, mask = parts
    losses, _ = lm_step_losses(student, ids, mask, LMLossSettings(loss="reverse_kl", combine="mean"), teachers)
    log_mean = torch.stack([t(ids)[:, :-1] for t in teachers]).mean(0).log_softmax(-1)
    log_q = student(ids)[:, :-1].log_softmax(-1)
    rkl = (log_q.exp() * (log_q - log_mean)).sum(-1)
    torch.testing.assert_close(losses["lm_reverse_kl"], rkl[kept(mask)].mean(), rtol=1e-5, atol=1e-6)
    one, _ = lm_step_losses(student, ids, mask, LMLossSettings(loss="reverse_kl"), teachers[:1])
    assert abs(one["lm_reverse_kl"].item() - losses["lm_reverse_kl"].item()) > 1e-3  # both teachers counted


def test_top_k_equal_to_the_vocabulary_is_the_full_loss_and_a_cache_stands_in_for_the_teacher(parts):
    student, teachers, ids, mask = parts
    settings = LMLossSettings(loss="jsd", beta=0.3, temperature=1.5)
    full, _ = lm_step_losses(student, ids, mask, settings, teachers[:1])
    top_v, _ = lm_step_losses(student, ids, mask, LMLossSettings(loss="jsd", beta=0.3, temperature=1.5, top_k=V),
                              teachers[:1])
    torch.testing.assert_close(top_v["lm_jsd"], full["lm_jsd"], rtol=1e-5, atol=1e-6)
    live, _ = lm_step_losses(student, ids, mask, LMLossSettings(loss="jsd", top_k=4), teachers[:1])
    with torch.no_grad():
        cache = teacher_topk(teachers[0](ids)[:, :-1], 4, 1.0)
    cached, _ = lm_step_losses(student, ids, mask, LMLossSettings(loss="jsd", top_k=4), cached_topk=cache)
    torch.testing.assert_close(cached["lm_jsd"], live["lm_jsd"])
    assert abs(live["lm_jsd"].item() - full["lm_jsd"].item()) > 1e-4  # k = 4 of 11 is not the full vocabulary


def test_chunked_equals_unchunked_and_gradients_reach_only_the_student(parts):
    student, teachers, ids, mask = parts
    whole, _ = lm_step_losses(student, ids, mask, LMLossSettings(loss="total_variation"), teachers[:1])
    chunked, _ = lm_step_losses(student, ids, mask, LMLossSettings(loss="total_variation", chunk_tokens=3),
                                teachers[:1])
    torch.testing.assert_close(chunked["lm_total_variation"], whole["lm_total_variation"], rtol=1e-6, atol=1e-7)
    chunked["lm_total_variation"].backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None for p in teachers[0].parameters())


def test_on_policy_lambda_one_trains_on_the_students_samples_not_the_corpus(parts):
    student, teachers, ids, mask = parts
    losses, batch = lm_step_losses(student, ids, mask, LMLossSettings(loss="forward_kl"), teachers[:1],
                                   source=OnPolicySource(lam=1.0, temperature=1.0, seed=5))
    assert batch.source == "student"
    assert torch.equal(batch.input_ids[:, :3], ids[:, :3])             # the prompt is kept
    assert not torch.equal(batch.input_ids, ids)                       # the completion was generated
    on_generated, _ = lm_step_losses(student, batch.input_ids, mask, LMLossSettings(loss="forward_kl"), teachers[:1])
    on_corpus, _ = lm_step_losses(student, ids, mask, LMLossSettings(loss="forward_kl"), teachers[:1])
    torch.testing.assert_close(losses["lm_forward_kl"], on_generated["lm_forward_kl"])
    assert abs(losses["lm_forward_kl"].item() - on_corpus["lm_forward_kl"].item()) > 1e-4


def test_held_out_figures_of_a_uniform_model_are_the_vocabulary_size(parts):
    _, teachers, ids, mask = parts

    class Uniform(torch.nn.Module):
        def forward(self, input_ids):
            return torch.zeros(*input_ids.shape, V)

    figures = held_out_figures(Uniform(), ids, mask, teacher=teachers[0])
    assert figures["perplexity"] == pytest.approx(V, rel=1e-6)
    assert figures["perplexity_under_teacher"] == pytest.approx(V, rel=1e-6)  # H(p, uniform) = log V for any p
    teacher_self = held_out_figures(teachers[0], ids, mask, teacher=teachers[0])
    entropy = -(teachers[0](ids)[:, :-1].softmax(-1) * teachers[0](ids)[:, :-1].log_softmax(-1)).sum(-1)
    assert teacher_self["perplexity_under_teacher"] == pytest.approx(
        math.exp(entropy[kept(mask)].mean().item()), rel=1e-5)
    assert 0.0 <= teacher_self["top1"] <= 1.0


def test_bad_settings_fail_in_one_line(parts):
    student, teachers, ids, mask = parts
    with pytest.raises(ValueError, match="unknown LM loss 'kl'"):
        LMLossSettings(loss="kl")
    with pytest.raises(ValueError, match="needs a teacher or a top-k cache"):
        lm_step_losses(student, ids, mask, LMLossSettings())
    with pytest.raises(ValueError, match=r"top-k k must be in \[1, vocabulary size 11\]"):
        lm_step_losses(student, ids, mask, LMLossSettings(top_k=12), teachers[:1])
    other = tiny_causal_lm(V + 1, layers=1, width=16, heads=2, max_length=L, seed=9)
    with pytest.raises(ValueError, match="teacher vocabulary 12 != student vocabulary 11"):
        lm_step_losses(student, ids, mask, LMLossSettings(), [other])
    with pytest.raises(ValueError, match="seq_kd generates with one teacher"):
        lm_step_losses(student, ids, mask, LMLossSettings(), teachers, source=OnPolicySource(lam=0.0, seq_kd=True))
