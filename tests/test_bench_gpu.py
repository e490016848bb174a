"""bench/gpu.sh, the one command for a GPU machine, runs end to end in its CI-sized CPU form (in-process), so it cannot rot
between the sessions that have a GPU: every benchmark it calls runs and the CRD-protocol smoke run prints
its projection, in fp32 and bf16."""
from __future__ import annotations

import os
import pathlib
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_script_runs_end_to_end_on_cpu_in_ci_size(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    out = subprocess.run(["bash", "bench/gpu.sh", "--device", "cpu", "--tiny"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert text.count("projected 240-epoch run") == 2, text[-3000:]  # fp32 and bf16
    assert "bf16" in text and "images/s" in text and "== bench/gpu.sh done" in text
