"""Every use of Ray's private internals, in one place (Ray 2.60 has no public API for these).

Why one module: private names change between Ray releases without notice. Keeping them here, each behind a
function with a fallback, means one file to read when Ray moves, and ``tests/test_library_internals.py``
imports every name below so an incompatible Ray fails that test loudly instead of silently changing
behaviour (pyproject bounds the Ray versions this was tested with).
"""
from __future__ import annotations

import json
import logging


def cluster_may_autoscale() -> bool:
    """Whether the Ray cluster may grow (an autoscaler with node types to launch) or is fixed-size.

    An autoscaler v2 reports its cluster config to the GCS (Train then checks a job against that maximum
    itself). The v1 monitor, which every head runs, writes its status to the internal KV; without a cluster
    config (a local Ray, ``ray start`` by hand) it runs a read-only provider that names each node's type
    ``node_<node id>``: that cluster never grows. When it cannot tell, it answers True (a bounded wait is
    safer than refusing a job a cluster could have run)."""
    try:
        from ray._private import ray_constants
        from ray._private.state import state
        from ray.autoscaler.v2.utils import is_autoscaler_v2
        from ray.experimental.internal_kv import _internal_kv_get

        if state.get_cluster_config() is not None or is_autoscaler_v2(fetch_from_server=True):
            return True
        status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        mapping = json.loads(status)["autoscaler_report"]["node_type_mapping"] if status else None
    except Exception:  # noqa: BLE001  (another Ray version, a GCS hiccup: cannot tell)
        return True
    return not mapping or any(kind != f"node_{node}" for node, kind in mapping.items())


def quiet_train_reports() -> None:
    """Ray Train logs one INFO line per ``report`` (the whole metrics dict) under a logger named after its
    module's file; a checkpoint every few epochs makes that noise in the user's console."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray Train version: its report lines stay
        pass
