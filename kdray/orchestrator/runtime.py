"""Ray as a runtime: start or join it once per process, check that a job's workers fit, and set what Train's
controller reads from the process that calls ``fit()``.

Why here: the in-process runner, the stage tasks, the teacher cache and a sweep all need Ray started the same
way (the CLI's SIGTERM handler put back after ``ray.init``, the same defaults) and the same resource checks.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator

from kdray.config import Config, ConfigError
from kdray.orchestrator.interrupts import reclaim_sigterm
from kdray.orchestrator.ray_internals import cluster_may_autoscale

START_TIMEOUT_VAR = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # read by Train's controller (forwarded from here)
# How often Train V2's controller polls its workers; every ``ray.train.report`` waits for the next poll, so
# Ray's default (2 s) costs ~1.9 s per checkpoint. 0.1 s measured: see bench/ray_overhead.py.
HEALTH_CHECK_VAR = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
HEALTH_CHECK_DEFAULT_S = "0.1"


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join ``address`` / ``RAY_ADDRESS`` when given, else start a local Ray for this process (``num_cpus``:
    at least this many logical CPUs, so a sweep's one trial may ask for more than the machine's cores).
    ``ray.init`` replaces the SIGTERM handler; the CLI's is put back (see kdray/orchestrator/interrupts.py)."""
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            cpus = max(os.cpu_count() or 1, num_cpus) if num_cpus else None
            ray.init(address="local", num_cpus=cpus, include_dashboard=True, log_to_driver=True)
    reclaim_sigterm()


@contextlib.contextmanager
def train_controller_env(start_timeout_s: float) -> Iterator[None]:
    """Set, for one ``fit()``, what Ray Train's controller reads from this process's environment (Train
    forwards these variables to it, wherever Ray places it): the worker-group start timeout, and a report
    poll of 0.1 s instead of 2 s unless the user set ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` themselves.
    Both are put back afterwards: in-process jobs share the caller's process."""
    wanted = {START_TIMEOUT_VAR: str(start_timeout_s),
              HEALTH_CHECK_VAR: os.environ.get(HEALTH_CHECK_VAR, HEALTH_CHECK_DEFAULT_S)}
    previous = {name: os.environ.get(name) for name in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def worker_bundle(cfg: Config, use_gpu: bool) -> dict[str, float]:
    """What one Train worker (or one stage task) reserves."""
    return {"CPU": float(cfg.ray.cpus_per_worker), **({"GPU": 1.0} if use_gpu else {})}


def check_fits(cfg: Config, workers: int, use_gpu: bool, what: str = "ray.num_workers") -> None:
    """Fail in one line, before anything starts, when ``workers`` bundles can never be placed: on a
    fixed-size cluster Train would wait for them forever (its start timeout is retried without limit). On
    a cluster that may autoscale, say that the wait begins (bounded by ``ray.start_timeout_s``).
    Identical bundles pack exactly node by node, so the count that fits is a sum of per-node quotients."""
    import ray

    bundle = worker_bundle(cfg, use_gpu)
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    room = sum(min(math.floor(node.get(r, 0) / need + 1e-9) for r, need in bundle.items()) for node in nodes)
    if room >= workers:
        return
    total = ray.cluster_resources()
    have = ", ".join(f"{total.get(r, 0):g} {r}" for r in bundle)
    per = " + ".join(f"{v:g} {r}" for r, v in bundle.items())
    if cluster_may_autoscale():
        print(f"kdray: {what}={workers} needs {workers} x ({per}) and the Ray cluster has {have} now; waiting up "
              f"to ray.start_timeout_s={cfg.ray.start_timeout_s:g} for the autoscaler to add nodes", flush=True)
        return
    raise ConfigError(f"{what}={workers} needs {workers} x ({per}) but this fixed-size Ray cluster has {have} on "
                      f"{len(nodes)} node(s), room for {room}; lower {what} or ray.cpus_per_worker "
                      f"(or ray.use_gpu), or join a bigger cluster with ray.address")


def resolve_use_gpu(cfg: Config) -> bool:
    """``ray.use_gpu`` decided: ``auto`` is whether the cluster has a GPU for every worker."""
    if cfg.ray.use_gpu == "auto":
        import ray

        return ray.cluster_resources().get("GPU", 0) >= cfg.ray.num_workers
    return bool(cfg.ray.use_gpu)


def gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


