"""Test fixtures: one Ray per test session (starting Ray costs seconds), a private MLflow store per test."""
from __future__ import annotations

import os
import sys

import pytest
import torch

from ray_cluster import ray_head  # noqa: F401  (fixture: a real `ray start` head for job-submission tests)

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.pop("RAY_ADDRESS", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)
torch.set_num_threads(1)  # tiny models: one thread avoids oversubscribing 2 cores shared with Ray workers

RAY_FIXTURES = {"ray_session", "ray_head"}  # fixtures that start a Ray


def _ray_up() -> bool:
    ray = sys.modules.get("ray")  # never imported here: importing Ray costs seconds
    return ray is not None and ray.is_initialized()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """The fast tier (``-m "not ray and not slow"``) must not start Ray: a test whose fixtures start one has to
    carry the ``ray`` mark, or it fails here, before it starts anything."""
    if item.get_closest_marker("ray") is None and RAY_FIXTURES & set(item.fixturenames):
        pytest.fail(f"{item.nodeid} uses {', '.join(sorted(RAY_FIXTURES & set(item.fixturenames)))}, which starts "
                    f"Ray: mark it @pytest.mark.ray", pytrace=False)


@pytest.fixture(autouse=True)
def _unmarked_tests_start_no_ray(request):
    """Guard for the same rule when the test itself starts Ray (``kdray.distill`` on Ray, ``ensure_ray``)."""
    was_up = _ray_up()
    yield
    if request.node.get_closest_marker("ray") is None and not was_up and _ray_up():
        pytest.fail(f"{request.node.nodeid} started Ray: mark it @pytest.mark.ray", pytrace=False)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with more logical CPUs than cores (a Tune trial plus 2 Train workers must fit)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, object_store_memory=256 * 2**20, include_dashboard=True,
                 log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture
def mlflow_uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in a fresh directory so default stores (./mlflow.db, ./kdray-runs) land in tmp."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test: tiny models train as fast on one, and far faster when other
    jobs share the cores (a test file asks for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

