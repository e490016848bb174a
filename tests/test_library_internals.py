"""The private Ray and MLflow internals kdray relies on still exist and behave as kdray expects.

Each of them lives in one module (kdray/orchestrator/ray_internals.py, mlflow_internals.py); this file is
the alarm for a new Ray or MLflow release: it fails here, by name, instead of a job quietly changing
behaviour (a cluster judged autoscaling, a tracking URI not put back, system metrics lost)."""
from __future__ import annotations

import inspect
import os
import logging

import pytest


def test_the_ray_internals_kdray_reads_exist_with_the_expected_shape():
    from ray._private import ray_constants
    from ray._private.state import state
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get
    from ray.train.v2._internal.execution import context

    assert isinstance(ray_constants.DEBUG_AUTOSCALING_STATUS, str)
    assert callable(state.get_cluster_config)
    assert "fetch_from_server" in inspect.signature(is_autoscaler_v2).parameters
    assert callable(_internal_kv_get)
    assert context.__file__.endswith(".py")


def test_quiet_train_reports_silences_trains_per_report_logger():
    from ray.train.v2._internal.execution import context

    from kdray.orchestrator.ray_internals import quiet_train_reports

    logging.getLogger(context.__file__).setLevel(logging.INFO)
    quiet_train_reports()
    assert logging.getLogger(context.__file__).level == logging.WARNING


@pytest.mark.ray
def test_a_local_ray_is_judged_fixed_size_from_the_monitors_status(ray_session):
    """The autoscaler's status is read (not the "cannot tell" fallback, which would say True)."""
    import json

    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    from kdray.orchestrator.ray_internals import cluster_may_autoscale

    import time

    deadline = time.monotonic() + 30  # the monitor writes its first status (with the nodes) a few seconds in

    def node_types():
        status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        return json.loads(status)["autoscaler_report"]["node_type_mapping"] if status else None

    mapping = node_types()
    while not mapping and time.monotonic() < deadline:
        time.sleep(0.5)
        mapping = node_types()
    assert mapping and all(kind == f"node_{node}" for node, kind in mapping.items())
    assert cluster_may_autoscale() is False


def test_fluent_store_puts_an_unset_tracking_uri_back_unset(tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    from kdray.orchestrator.mlflow_internals import fluent_store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with fluent_store(uri):
        assert mlflow.get_tracking_uri() == uri
    assert tracking_utils._tracking_uri is None
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_the_system_metrics_monitor_has_the_methods_kdray_drives():
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    params = inspect.signature(SystemMetricsMonitor).parameters
    assert {"run_id", "resume_logging", "tracking_uri"} <= set(params)
    for name in ("start", "finish", "collect_metrics", "aggregate_metrics", "publish_metrics"):
        assert callable(getattr(SystemMetricsMonitor, name)), name
