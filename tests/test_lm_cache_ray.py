"""The LM top-k cache written with Ray Data (kdray.orchestrator.lm_cache) is the in-process cache: the same ids,
log-probs, metadata and fingerprint, rows in the original order; a student trained from it equals live top-k
training step for step; a cache made by other teacher weights is refused in one line; bad input fails in one
line before Ray starts."""
import os

import pytest
import torch
from test_lm_topk_cache import K, N, V, batches, corpus, train

from kdray.algorithms.lm.topk import TeacherTopK, teacher_topk
from kdray.data.lm_topk_cache import lm_cache_fingerprint, read_lm_topk_parquet, write_lm_topk_parquet
from kdray.models.causal_lm import tiny_causal_lm
from kdray.orchestrator.lm_cache import write_lm_cache_with_ray

KNOBS = {"layers": 2, "width": 32, "heads": 4, "max_length": 32}
SPEC = {"model": "causal_lm", "args": KNOBS}  # the registry's tiny causal LM, V tokens
TOKENIZER = "test-tokenizer"


def teacher(seed=1):
    return tiny_causal_lm(V, **KNOBS, seed=seed).eval()


def in_process_cache(path, model, ids, k, temperature, batch):
    """The reference: the teacher in this process, batch by batch, written by write_lm_topk_parquet."""
    with torch.no_grad():
        parts = [teacher_topk(model(ids[i:i + batch]), k, temperature) for i in range(0, len(ids), batch)]
    return write_lm_topk_parquet(str(path), torch.cat([p.indices for p in parts]),
                                 torch.cat([p.logprobs for p in parts]), temperature=temperature, vocab_size=V,
                                 fingerprint=lm_cache_fingerprint(model.state_dict(), TOKENIZER, ids, k, temperature))


def ray_cache(path, ids, k, temperature, batch_size, concurrency):
    return write_lm_cache_with_ray(SPEC, teacher().state_dict(), ids, vocab_size=V, k=k, temperature=temperature,
                                   path=str(path), tokenizer=TOKENIZER, batch_size=batch_size,
                                   concurrency=concurrency)


TEMPERATURE = 2.0


def cache_ids():
    """The training corpus's N sequences first, then 33 more random ones: 37 rows of 12 tokens."""
    ids, _ = corpus()
    extra = torch.randint(0, V, (33, ids.shape[1]), generator=torch.Generator().manual_seed(5))
    return torch.cat([ids, extra])


@pytest.fixture(scope="module")
def ray_cache_path(ray_session, tmp_path_factory):
    """One Ray Data cache for the module: 2 actors, several blocks, batches of 5 sequences, T = 2."""
    return ray_cache(tmp_path_factory.mktemp("lmcache") / "topk.parquet", cache_ids(), K, TEMPERATURE,
                     batch_size=5, concurrency=2)


@pytest.mark.ray
def test_ray_data_cache_equals_the_in_process_cache(ray_cache_path, tmp_path):
    """ids and float16 log-probs equal exactly (the reference ran in batches of 8, Ray in batches of 5), as do
    k, T, vocabulary and fingerprint, rows in the original order."""
    ids = cache_ids()
    got = read_lm_topk_parquet(ray_cache_path)
    want = read_lm_topk_parquet(in_process_cache(tmp_path / "ref.parquet", teacher(), ids, K, TEMPERATURE, 8))
    assert got.indices.shape == (len(ids), ids.shape[1], K)
    assert torch.equal(got.indices, want.indices) and torch.equal(got.logprobs, want.logprobs)
    assert (got.k, got.temperature, got.vocab_size, got.fingerprint) == (
        K, TEMPERATURE, V, lm_cache_fingerprint(teacher().state_dict(), TOKENIZER, ids, K, TEMPERATURE))
    # the stored values are the teacher's top-k log-probs at T of these very rows, in the original order
    with torch.no_grad():
        live = teacher_topk(teacher()(ids), K, TEMPERATURE, value_dtype=torch.float16)
    assert torch.equal(got.indices, live.indices) and torch.equal(got.logprobs, live.logprobs)
    assert not torch.equal(got.indices[0], got.indices[1])  # rows differ, so a shuffled order would show
    assert os.listdir(os.path.dirname(ray_cache_path)) == ["topk.parquet"]  # the staged parts are gone


@pytest.mark.ray
def test_training_from_the_ray_cache_equals_live_top_k_step_for_step(ray_cache_path):
    """The student of tests/test_lm_topk_cache.py on its corpus (the cache's first N rows) at T = 2."""
    ids, _ = corpus()
    model = teacher()

    def live(rows):
        with torch.no_grad():
            topk = teacher_topk(model(ids[rows]), K, TEMPERATURE, value_dtype=torch.float16)
        return TeacherTopK(topk.indices[:, :-1], topk.logprobs[:, :-1], topk.temperature, topk.vocab_size)

    cache = read_lm_topk_parquet(ray_cache_path, expected_fingerprint=lm_cache_fingerprint(
        model.state_dict(), TOKENIZER, cache_ids(), K, TEMPERATURE))
    assert torch.equal(cache_ids()[:N], ids)

    def cached(rows):
        indices, logprobs = cache.rows(rows)
        return TeacherTopK(indices[:, :-1], logprobs[:, :-1], cache.temperature, cache.vocab_size)

    live_losses, live_student = train(live)
    cached_losses, cached_student = train(cached)
    assert len(cached_losses) == len(batches()) and cached_losses == live_losses
    assert live_losses[-1] < live_losses[0]
    for a, b in zip(live_student.parameters(), cached_student.parameters()):
        assert torch.equal(a, b)


@pytest.mark.ray
def test_a_cache_of_other_teacher_weights_is_refused_in_one_line(ray_cache_path):
    stale = lm_cache_fingerprint(teacher(seed=3).state_dict(), TOKENIZER, cache_ids(), K, TEMPERATURE)
    with pytest.raises(ValueError, match="differ; rebuild the cache") as err:
        read_lm_topk_parquet(ray_cache_path, expected_fingerprint=stale)
    assert "\n" not in str(err.value) and stale[:12] in str(err.value)


@pytest.mark.ray
def test_more_actors_than_the_cluster_has_cpus_fails_in_one_line(ray_session, tmp_path):
    cpus = int(ray_session.cluster_resources()["CPU"])
    ids = torch.randint(0, V, (cpus + 1, 4), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=f"{cpus + 1} teacher actor\\(s\\) x 1 CPU > the cluster's {cpus} CPUs; "
                                         "lower concurrency") as err:
        write_lm_cache_with_ray(SPEC, teacher().state_dict(), ids, vocab_size=V, k=K, temperature=1.0,
                                path=str(tmp_path / "topk.parquet"), tokenizer=TOKENIZER, batch_size=1,
                                concurrency=cpus + 1)
    assert "\n" not in str(err.value) and not os.listdir(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"spec": {"model": "gpt9", "args": KNOBS}}, "model 'gpt9' is not a registered causal LM; allowed: causal_lm"),
    ({"spec": {"model": "resnet20", "args": {}}}, "model 'resnet20' is not a registered causal LM"),
    ({"spec": {"model": "causal_lm", "args": {**KNOBS, "widht": 8}}}, r"has no knob\(s\) \['widht'\]"),
    ({"state": "narrow"}, "LM teacher state for causal_lm .* has shape .* but the model expects"),
    ({"state": "missing"}, r"does not match the model \(missing \['lm_head.weight'\]"),
    ({"ids": "out of vocabulary"}, f"token ids in \\[0, {V}\\] but the teacher's vocabulary is \\[0, {V - 1}\\]"),
    ({"ids": "float"}, "must be a non-empty 2-D integer tensor"),
    ({"ids": "long"}, "sequences have 40 tokens but the teacher takes at most 32; pack shorter sequences"),
    ({"k": V + 1}, f"k must be in \\[1, vocabulary size {V}\\], got {V + 1}"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"exists": True}, "already exists; pass overwrite=True"),
])
def test_bad_input_fails_in_one_line_before_ray_starts(change, message, tmp_path):
    ids, _ = corpus()
    state = teacher().state_dict()
    if change.get("state") == "narrow":
        state = tiny_causal_lm(V, **{**KNOBS, "width": 16}).state_dict()
    elif change.get("state") == "missing":
        state = {key: value for key, value in state.items() if key != "lm_head.weight"}
    if change.get("ids") == "out of vocabulary":
        ids = ids.clone()
        ids[0, 0] = V
    elif change.get("ids") == "float":
        ids = ids.float()
    elif change.get("ids") == "long":
        ids = torch.zeros(2, 40, dtype=torch.long)
    path = tmp_path / "topk.parquet"
    if change.get("exists"):
        path.write_bytes(b"an earlier cache")
    with pytest.raises(ValueError, match=message) as err:
        write_lm_cache_with_ray(change.get("spec", SPEC), state, ids, vocab_size=V, k=change.get("k", K),
                                temperature=change.get("temperature", 1.0), path=str(path), tokenizer=TOKENIZER)
    assert "\n" not in str(err.value)
    assert not change.get("exists") or path.read_bytes() == b"an earlier cache"
    assert [p.name for p in tmp_path.iterdir()] == (["topk.parquet"] if change.get("exists") else [])


def test_the_actor_of_a_transformers_teacher_emits_the_in_process_top_k():
    """LMTopKActor called in this process (no Ray) on a batch of rows out of order: a 1-layer Llama from
    hf_causal_lm, rebuilt from its state dict, gives teacher_topk's ids and float16 log-probs per token."""
    import numpy as np
    import pyarrow as pa

    from kdray.models import create_model
    from kdray.orchestrator.lm_cache import LMTopKActor, fixed_lists

    spec = {"model": "hf_causal_lm", "args": {"arch": "llama", "layers": 1, "hidden": 32, "heads": 2,
                                              "intermediate": 64, "max_length": 16, "seed": 3}}
    hf = create_model("hf_causal_lm", V, **spec["args"]).eval()
    ids = torch.randint(0, V, (3, 10), generator=torch.Generator().manual_seed(6))
    rows = np.array([7, 2, 5])
    batch = pa.table({"sequence": pa.array(rows), "input_ids": pa.FixedSizeListArray.from_arrays(
        pa.array(ids.numpy().reshape(-1)), ids.shape[1])})
    out = LMTopKActor(spec, hf.state_dict(), 5, 2.0, V)(batch)
    with torch.no_grad():
        live = teacher_topk(hf(ids), 5, 2.0, value_dtype=torch.float16)
    assert out["sequence"].to_pylist() == np.repeat(rows, 10).tolist()
    assert out["position"].to_pylist() == list(range(10)) * 3
    assert torch.equal(fixed_lists(out["indices"], (3, 10, 5)).long(), live.indices)
    assert torch.equal(fixed_lists(out["logprobs"], (3, 10, 5)).float(), live.logprobs)
