"""LM placement on Ray Train (2 gloo CPU workers) equals one process: two teachers sharded one per worker with a
DDP student, and an FSDP2 student (bf16 teachers) checkpointed on rank 0 and resumed in a second Train run.

Tolerances as in tests/test_lm_placement.py (the same runs in ``torch.multiprocessing``): combined teacher
log-probs within 1e-6, student weights within 1e-5 (fp32; the remaining differences are summation order).
"""
from __future__ import annotations

import signal

import pytest
import torch

from kdray.orchestrator.lm_ray import run_lm_on_ray
from test_lm_placement import COMBINED_TOL, STEPS, _job, assert_same_student, one_process

pytestmark = pytest.mark.ray


def test_two_teachers_sharded_on_two_train_workers_equal_one_process(tmp_path, ray_session):
    job = _job(rule="confidence")
    got = run_lm_on_ray(job, workers=2, storage_path=str(tmp_path / "ray"), name="lm-sharded")
    expected_state, expected_combined = one_process(job)
    diff = float((got["combined"] - expected_combined).abs().max())
    assert diff <= COMBINED_TOL, f"combined teacher log-probs differ by {diff:.2e}"
    assert_same_student(got["state"], expected_state)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "Train's SIGINT handler outlived fit()"


@pytest.mark.slow
def test_fsdp_student_on_two_train_workers_resumes_and_equals_one_process(tmp_path, ray_session):
    path = str(tmp_path / "ckpt" / "student.pt")
    kw = dict(student_sharding="fsdp", teacher_dtype=torch.bfloat16, checkpoint_path=path)
    first = run_lm_on_ray(_job(**kw, checkpoint_every=1, stop_after=2), 2, str(tmp_path / "ray"), "lm-fsdp-a")
    assert first["start"] == 0 and torch.load(path, weights_only=True)["step"] == 2
    resumed = run_lm_on_ray(_job(**kw), 2, str(tmp_path / "ray"), "lm-fsdp-b")
    assert resumed["start"] == 2 and len(resumed["losses"]) == STEPS - 2
    assert_same_student(resumed["state"], one_process(_job(teacher_dtype=torch.bfloat16))[0])
