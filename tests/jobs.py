"""Small job configs shared by the tests, and a driver for ``kdray`` subprocesses."""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml


def load_bench(name: str):
    """``bench/<name>.py`` as a module (the benches are scripts, not a package), for tests that run a bench's
    jobs or check its arithmetic."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def digits_job(tmp_path, mlflow_uri=None, **over) -> dict:
    """A small, fast digits job config as a dict (teacher trained in-job)."""
    cfg = {
        "name": "t",
        "output_dir": str(tmp_path / "runs"),
        "data": {"name": "digits", "options": {"train_fraction": 0.2}},
        "teacher": {"model": "digits_cnn", "train": {"epochs": 8, "lr": 0.05, "batch_size": 32}},
        "student": {"model": "digits_mlp", "args": {"hidden": 16}},
        "methods": [{"name": "kd", "alpha": 0.9, "temperature": 4.0}],
        "train": {"epochs": 8, "lr": 0.05, "batch_size": 32},
        "seeds": [0],
        "baseline": False,
        "ray": {"num_workers": 0},
        "mlflow": {"tracking_uri": mlflow_uri, "enabled": mlflow_uri is not None},
    }
    return with_overrides(cfg, **over)


def with_overrides(cfg: dict, **over) -> dict:
    """``cfg`` with each ``section__key=value`` set (nested sections created as needed), for the job helpers."""
    for key, value in over.items():
        node = cfg
        *path, last = key.split("__")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return cfg


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    # one intra-op thread: tiny models gain nothing from more, and spinning threads crawl on a busy 2-core box
    return {**env, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def drive_cli(tmp_path, job: dict, *extra: str, wait_s: float, signal_when=None, send=signal.SIGINT,
              appear_timeout_s: float = 120, log_name: str = "driver.log", ray_address: str | None = None,
              command: str = "run", stderr_name: str | None = None) -> tuple[subprocess.Popen, str]:
    """``kdray <command>`` (default ``run``) in a subprocess; with ``signal_when``, ``send`` is sent once that
    file appears. Waits ``wait_s`` for the exit (a driver still alive then is killed) and returns it with its
    output (stdout and stderr; stderr alone goes to ``tmp_path / stderr_name`` when that is given)."""
    path = tmp_path / ("job.yaml" if command == "run" else f"{command}.yaml")
    path.write_text(yaml.safe_dump(job))
    log = open(tmp_path / log_name, "w")
    err = open(tmp_path / stderr_name, "w") if stderr_name else subprocess.STDOUT
    env = {**cli_env(), "RAY_ADDRESS": ray_address} if ray_address else cli_env()
    proc = subprocess.Popen([sys.executable, "-m", "kdray.orchestrator.cli", command, str(path), *extra],
                            stdout=log, stderr=err, cwd=tmp_path, env=env)
    try:
        if signal_when is not None:
            wait_for(signal_when, proc, appear_timeout_s)
            proc.send_signal(send)
        proc.wait(wait_s)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
        if stderr_name:
            err.close()
    return proc, (tmp_path / log_name).read_text()


def wait_for(path, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if proc.poll() is not None:
            pytest.fail(f"the driver ended (rc {proc.returncode}) before {path} appeared")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} did not appear in {timeout_s}s")
        time.sleep(0.01)
