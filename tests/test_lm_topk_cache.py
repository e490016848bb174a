"""The offline LM top-k cache: Parquet round trip, fingerprints, bytes per token, and training from the cache
equal to live top-k training step for step on a tiny causal LM."""
import pytest
import torch

from kdray.algorithms.lm.token_loss import next_token_mask
from kdray.algorithms.lm.topk import TeacherTopK, teacher_topk, topk_distill_loss
from kdray.data.lm_topk_cache import (bytes_per_token, lm_cache_fingerprint, read_lm_topk_metadata,
                                      read_lm_topk_parquet, write_lm_topk_parquet)
from kdray.models.causal_lm import tiny_causal_lm

V, L, N, B, K = 40, 12, 4, 2, 8


def corpus():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (N, L), generator=g)
    targets = torch.zeros(N, L)
    targets[:, 4:] = 1          # 4 prompt tokens, then the completion
    return ids, next_token_mask(targets)


def batches(epochs=2):
    return [torch.arange(start, start + B) for _ in range(epochs) for start in range(0, N, B)]


def train(topk_for_rows):
    ids, mask = corpus()
    student = tiny_causal_lm(V, layers=1, width=16, heads=2, max_length=16, seed=2)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = []
    for rows in batches():
        topk = topk_for_rows(rows)
        loss = topk_distill_loss(student(ids[rows])[:, :-1], topk, mask[rows], divergence="jsd", beta=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, student


def test_training_from_the_cache_equals_live_top_k_step_for_step(tmp_path):
    ids, _ = corpus()
    teacher = tiny_causal_lm(V, layers=2, width=32, heads=4, max_length=16, seed=1).eval()

    def live(rows):
        with torch.no_grad():
            topk = teacher_topk(teacher(ids[rows]), K, temperature=1.0, value_dtype=torch.float16)
        return TeacherTopK(topk.indices[:, :-1], topk.logprobs[:, :-1], topk.temperature, topk.vocab_size)

    fingerprint = lm_cache_fingerprint(teacher.state_dict(), "test-tokenizer", ids, K, 1.0)
    with torch.no_grad():   # the teacher runs once, over the same rows
        parts = [teacher_topk(teacher(ids[rows]), K) for rows in batches(epochs=1)]
    path = write_lm_topk_parquet(str(tmp_path / "topk.parquet"), torch.cat([p.indices for p in parts]),
                                 torch.cat([p.logprobs for p in parts]), temperature=1.0, vocab_size=V,
                                 fingerprint=fingerprint)
    live_losses, live_student = train(live)
    teacher = None          # the cached run has no teacher: any use of it would fail
    cache = read_lm_topk_parquet(path, expected_fingerprint=fingerprint)

    def cached(rows):
        indices, logprobs = cache.rows(rows)
        return TeacherTopK(indices[:, :-1], logprobs[:, :-1], cache.temperature, cache.vocab_size)

    cached_losses, cached_student = train(cached)
    assert cached_losses == live_losses
    assert live_losses[-1] < live_losses[0]
    for a, b in zip(live_student.parameters(), cached_student.parameters()):
        assert torch.equal(a, b)


def test_round_trip_keeps_int32_ids_and_float16_values(tmp_path):
    g = torch.Generator().manual_seed(3)
    indices = torch.randint(0, 50_000, (3, 5, 4), generator=g)
    logprobs = -torch.rand(3, 5, 4, generator=g) * 10
    path = write_lm_topk_parquet(str(tmp_path / "c.parquet"), indices, logprobs, temperature=2.0, vocab_size=50_000,
                                 fingerprint="f" * 64)
    cache = read_lm_topk_parquet(path)
    assert torch.equal(cache.indices, indices) and torch.equal(cache.logprobs, logprobs.half().float())
    assert (cache.k, cache.temperature, cache.vocab_size) == (4, 2.0, 50_000)


def test_bytes_per_token_stays_below_the_raw_payload(tmp_path):
    """k int32 ids + k float16 values = 6k bytes per token before encoding; Parquet's dictionary encoding and
    compression bring it below that (44 bytes at k = 16 over a 1000-token vocabulary when measured), and the
    sequence / position columns cost almost nothing."""
    g = torch.Generator().manual_seed(4)
    k = 16
    logits = torch.randn(32, 64, 1000, generator=g)
    topk = teacher_topk(logits, k)
    path = write_lm_topk_parquet(str(tmp_path / "b.parquet"), topk.indices, topk.logprobs, temperature=1.0,
                                 vocab_size=1000, fingerprint="0" * 64)
    per_token = bytes_per_token(path)
    print(f"bytes per token at k={k}: {per_token:.1f} (raw payload {6 * k})")
    assert 0 < per_token < 6 * k


def test_fingerprint_changes_with_teacher_tokenizer_data_k_and_temperature(tmp_path):
    ids, _ = corpus()
    t1 = tiny_causal_lm(V, layers=1, width=16, heads=2, max_length=16, seed=1).state_dict()
    t2 = tiny_causal_lm(V, layers=1, width=16, heads=2, max_length=16, seed=2).state_dict()
    base = lm_cache_fingerprint(t1, "tok", ids, K, 1.0)
    assert base == lm_cache_fingerprint(t1, "tok", ids.clone(), K, 1.0)
    assert base == lm_cache_fingerprint(t1, "tok", ids.numpy(), K, 1.0)  # numpy token ids are the same data
    others = [lm_cache_fingerprint(t2, "tok", ids, K, 1.0), lm_cache_fingerprint(t1, "tok2", ids, K, 1.0),
              lm_cache_fingerprint(t1, "tok", ids.flip(0), K, 1.0), lm_cache_fingerprint(t1, "tok", ids, K + 1, 1.0),
              lm_cache_fingerprint(t1, "tok", ids, K, 2.0)]
    assert len(set(others + [base])) == 6
    path = write_lm_topk_parquet(str(tmp_path / "f.parquet"), torch.zeros(1, 2, 3, dtype=torch.long),
                                 torch.zeros(1, 2, 3), temperature=1.0, vocab_size=V, fingerprint=base)
    with pytest.raises(ValueError, match=f"made with fingerprint {base[:12]}, expected {others[0][:12]}"):
        read_lm_topk_parquet(path, expected_fingerprint=others[0])
    assert read_lm_topk_metadata(path) == {"k": 3, "temperature": 1.0, "vocab_size": V, "length": 2,
                                           "sequences": 1, "fingerprint": base}  # from the schema, no rows read
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1]}), tmp_path / "plain.parquet")
    with pytest.raises(ValueError, match="is not a kdray LM top-k cache"):
        read_lm_topk_metadata(str(tmp_path / "plain.parquet"))
