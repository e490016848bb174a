"""kdray.algorithms.lm.loop: an LM stage's epochs on gensim's Lee corpus (characters): the student learns, a run
resumed from an epoch's end (state through torch.save / weights_only load) equals the uninterrupted run bit for
bit, on-policy draws included, per-step losses reach the callback, a NaN stops the run naming the loss."""
from __future__ import annotations

import io

import pytest
import torch

from kdray.algorithms.lm.loop import LMTrainLoop
from kdray.algorithms.lm.on_policy import OnPolicySource
from kdray.algorithms.lm.step import LMLossSettings
from kdray.data.char_corpus import lee_background_path, load_char_corpus
from kdray.models.causal_lm import tiny_causal_lm

LENGTH, BATCH, STEPS = 24, 16, 6


@pytest.fixture(scope="module")
def corpus():
    return load_char_corpus(lee_background_path())


def batches_of(corpus, seed):
    def batches(epoch):
        g = torch.Generator().manual_seed(1000 * seed + epoch)
        out = []
        for _ in range(STEPS):
            ids = corpus.windows("train", BATCH, LENGTH, g)
            mask = torch.ones_like(ids, dtype=torch.float32)
            mask[:, :4] = 0                      # a 4-character prompt, so on-policy batches have one
            out.append((ids, mask))
        return out
    return batches


def held_out(corpus):
    ids = corpus.windows("held_out", 32, LENGTH, torch.Generator().manual_seed(7))
    return ids, torch.ones_like(ids, dtype=torch.float32)


def loop_for(corpus, epochs, settings, teachers=(), source=None, **kw):
    student = tiny_causal_lm(corpus.vocab_size, layers=1, width=32, heads=2, max_length=LENGTH, seed=3)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    return LMTrainLoop(student, opt, batches_of(corpus, 0), epochs, settings, held_out(corpus), teachers, source, **kw)


def test_a_student_on_ce_learns_the_corpus_well_below_uniform(corpus):
    loop = loop_for(corpus, 4, LMLossSettings(loss="ce"))
    rows = loop.run()
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    # uniform over the corpus's 55 characters is 55; measured after 24 steps: 44.5, 27.6, 20.3, 18.5 by epoch
    assert rows[-1]["val_perplexity"] < 0.5 * corpus.vocab_size, rows
    assert rows[-1]["val_perplexity"] < rows[0]["val_perplexity"]
    assert rows[-1]["train_lm_ce"] < rows[0]["train_lm_ce"]


def test_resumed_from_an_epoch_end_equals_the_uninterrupted_run_with_on_policy_draws(corpus):
    teacher = tiny_causal_lm(corpus.vocab_size, layers=1, width=32, heads=2, max_length=LENGTH, seed=11)
    settings = LMLossSettings(loss="jsd", beta=0.5)
    whole = loop_for(corpus, 2, settings, [teacher], OnPolicySource(lam=0.5, seed=2))
    whole_rows = whole.run()
    first = loop_for(corpus, 2, settings, [teacher], OnPolicySource(lam=0.5, seed=2))
    first.epochs = 1
    first.run()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = loop_for(corpus, 2, settings, [teacher], OnPolicySource(lam=0.5, seed=99))  # seed restored below
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    rows = resumed.run()
    assert rows == whole_rows
    for a, b in zip(whole.student.state_dict().values(), resumed.student.state_dict().values()):
        assert torch.equal(a, b)
    assert "val_perplexity_under_teacher" in rows[-1] and resumed.step == 2 * STEPS


def test_every_nth_step_reaches_the_callback_with_named_losses(corpus):
    seen = []
    loop = loop_for(corpus, 1, LMLossSettings(loss="ce"), log_every_steps=2, on_step=lambda s, l: seen.append((s, l)))
    loop.run()
    assert [s for s, _ in seen] == [2, 4, 6] and all(set(l) == {"lm_ce"} for _, l in seen)


def test_a_non_finite_loss_stops_the_run_naming_it(corpus):
    loop = loop_for(corpus, 1, LMLossSettings(loss="ce"))
    with torch.no_grad():
        next(loop.student.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="LM loss lm_ce is nan at step 0"):
        loop.run()
