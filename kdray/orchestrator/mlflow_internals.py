"""Every use of MLflow's private or undocumented internals, in one place.

Why one module: these names are not MLflow's public API and may change in any release; each is wrapped
here and ``tests/test_library_internals.py`` exercises them, so an incompatible MLflow fails there loudly
(pyproject bounds the MLflow versions this was tested with). Everything else uses ``mlflow`` and
``MlflowClient`` only.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

_MONITORS: dict[str, object] = {}  # run id -> its system-metrics monitor in this process


@contextlib.contextmanager
def quiet_logger(name: str, level: int = logging.ERROR) -> Iterator[None]:
    """Raise logger ``name`` to ``level`` for the block (MLflow's INFO lines are noise in a job's output)."""
    log = logging.getLogger(name)
    previous = log.level
    log.setLevel(max(level, previous))
    try:
        yield
    finally:
        log.setLevel(previous)


@contextlib.contextmanager
def fluent_store(uri: str) -> Iterator[None]:
    """Point mlflow's fluent functions (``mlflow.pytorch.log_model`` takes no store argument) at ``uri`` for
    the block, then put the process's tracking URI and ``MLFLOW_TRACKING_URI`` (which ``set_tracking_uri``
    exports) back exactly as they were: in-process jobs share the caller's process. MLflow's public
    ``get_tracking_uri`` resolves an unset URI to its default, so only the private variable tells "unset"."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    previous, previous_env = getattr(tracking_utils, "_tracking_uri", None), os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


def start_system_metrics(uri: str, run_id: str):
    """Sample CPU, memory, disk, network (and GPU with ``nvidia-ml-py``) into ``run_id`` as ``system/*``
    metrics every ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` seconds (10 by default).

    This is the monitor ``mlflow.start_run(run_id=..., log_system_metrics=True)`` starts, driven directly
    with the store's URI: a fluent run is per-thread state that a failing stage would leave active in the
    caller's process (the next ``mlflow.start_run`` there then refuses), and its end sets the run's status.
    The monitor never changes the status; it stops itself once the run is no longer RUNNING (the driver
    marks it FAILED/KILLED), and a monitor left by an earlier attempt at the same run is stopped first.
    """
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    stop_system_metrics(run_id)
    with quiet_logger("mlflow.system_metrics", logging.WARNING):  # "Started monitoring", "Skip GPU metrics"
        monitor = SystemMetricsMonitor(run_id, resume_logging=True, tracking_uri=uri)
        monitor.start()
    _MONITORS[run_id] = monitor
    return monitor


def stop_system_metrics(run_id: str) -> None:
    """Stop ``run_id``'s monitor and log what it sampled since its last write (a stage shorter than the
    sampling interval still gets one row: MLflow's own stop drops that tail)."""
    monitor = _MONITORS.pop(run_id, None)
    if monitor is None:
        return
    with quiet_logger("mlflow.system_metrics", logging.WARNING):
        monitor.finish()
    monitor.collect_metrics()
    monitor.publish_metrics(monitor.aggregate_metrics())
    monitor.mlflow_logger.flush()
