"""``kdray runs``: the job runs in an MLflow store, and the stale ones (``--stale``, ``--close``).

A driver that dies outright (SIGKILL, OOM killer, a lost node) cannot mark its MLflow run, which then
stays RUNNING. Every job run carries its driver's ``kdray.driver_pid`` and ``kdray.driver_host`` tags
(set by :meth:`JobTracking.start`, again on ``--resume``). A run is *stale* when it is RUNNING, its driver
ran on this host, and no process with that pid exists any more (a zombie, or a newer process that reused
the pid, counts as gone). Runs driven from other hosts cannot be judged from here and are never closed.
``--close`` marks stale runs and their RUNNING stage runs FAILED with ``kdray.failure_reason`` "driver gone";
``kdray run --resume`` reopens a closed job run.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

STALE_REASON = "driver gone"
PID_TAG, HOST_TAG = "kdray.driver_pid", "kdray.driver_host"


@dataclass
class JobRun:
    run_id: str
    name: str
    experiment_id: str
    status: str
    start_time_ms: int
    driver_pid: int | None
    driver_host: str | None
    resumed_at: str | None

    @property
    def driver_since_s(self) -> float:
        """When the current driver took the run over: the last ``--resume``, else the run's start."""
        if self.resumed_at:
            try:
                return time.mktime(time.strptime(self.resumed_at, "%Y-%m-%dT%H:%M:%S"))
            except ValueError:
                pass
        return self.start_time_ms / 1000


def process_start_s(pid: int) -> tuple[float | None, str | None]:
    """(start time in epoch seconds, state letter) of a process, from Linux ``/proc``; (None, None) elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        with open("/proc/stat") as fh:
            boot = next(float(line.split()[1]) for line in fh if line.startswith("btime"))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK"), fields[0]
    except (OSError, ValueError, IndexError, StopIteration):
        return None, None


def driver_alive(pid: int, since_s: float | None = None) -> bool:
    """Whether process ``pid`` (on this host) exists and could be the driver that took its run at ``since_s``."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    started, state = process_start_s(pid)
    if state in ("Z", "X"):  # killed, not yet reaped by its parent
        return False
    if started is not None and since_s is not None and started > since_s + 1.0:
        return False  # the pid was reused by a process that started after the driver took the run
    return True


def job_runs(client, experiment: str | None = None, running_only: bool = False,
             max_results: int = 1000) -> list[JobRun]:
    """Job (parent) runs, newest first, in one experiment or all active ones."""
    if experiment is not None:
        exp = client.get_experiment_by_name(experiment)
        exp_ids = [exp.experiment_id] if exp is not None else []
    else:
        exp_ids = [e.experiment_id for e in client.search_experiments()]
    if not exp_ids:
        return []
    query = "tags.`kdray.role` = 'job'" + (" and attributes.status = 'RUNNING'" if running_only else "")
    runs = client.search_runs(exp_ids, query, max_results=max_results, order_by=["attributes.start_time DESC"])
    out = []
    for run in runs:
        tags = run.data.tags
        pid = tags.get(PID_TAG)
        out.append(JobRun(run.info.run_id, run.info.run_name or "", run.info.experiment_id, run.info.status,
                          run.info.start_time or 0, int(pid) if pid and pid.isdigit() else None,
                          tags.get(HOST_TAG), tags.get("kdray.resumed_at")))
    return out


def is_stale(run: JobRun, host: str | None = None) -> bool:
    if run.status != "RUNNING" or run.driver_pid is None:
        return False
    if run.driver_host != (host or socket.gethostname()):
        return False
    return not driver_alive(run.driver_pid, run.driver_since_s)


def stale_runs(client, experiment: str | None = None, host: str | None = None) -> list[JobRun]:
    return [r for r in job_runs(client, experiment, running_only=True) if is_stale(r, host)]


def close_run(client, run: JobRun, reason: str = STALE_REASON) -> list[str]:
    """Mark a job run and its RUNNING stage runs FAILED with ``reason``; return the run ids closed."""
    from kdray.orchestrator.tracking import FAILURE_TAG

    children = client.search_runs([run.experiment_id], f"tags.`mlflow.parentRunId` = '{run.run_id}' "
                                                       "and attributes.status = 'RUNNING'")
    closed = []
    for run_id in [c.info.run_id for c in children] + [run.run_id]:
        client.set_tag(run_id, FAILURE_TAG, reason)
        client.set_terminated(run_id, "FAILED")
        closed.append(run_id)
    return closed


def _cmd_runs(args) -> int:
    from mlflow.tracking import MlflowClient

    from kdray.orchestrator.tracking import check_reachable, resolve_tracking_uri

    uri = resolve_tracking_uri(args.store)
    if uri.startswith("sqlite:///") and not os.path.exists(uri.removeprefix("sqlite:///")):
        print(f"no MLflow store at {uri}")  # and none created by looking
        return 0
    check_reachable(uri)
    client = MlflowClient(uri)
    stale = args.stale or args.close
    runs = stale_runs(client, args.experiment) if stale else job_runs(client, args.experiment,
                                                                      max_results=args.max)
    if not runs:
        print("no stale job runs" if stale else f"no job runs in {uri}")
        return 0
    here = socket.gethostname()
    for r in runs:
        if r.driver_pid is None:
            driver = "driver unknown"
        elif r.status != "RUNNING":
            driver = f"{r.driver_host}:{r.driver_pid}"
        elif r.driver_host != here:
            driver = f"{r.driver_host}:{r.driver_pid} (other host)"
        else:
            driver = f"{r.driver_host}:{r.driver_pid} ({'alive' if not is_stale(r, here) else 'gone'})"
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.start_time_ms / 1000))
        print(f"{r.run_id}  {r.status:<8}  {r.name:<24}  {started}  {driver}")
    if args.close:
        closed = [cid for r in runs for cid in close_run(client, r)]
        print(f"closed {len(runs)} stale job run(s) ({len(closed)} runs with stages) as FAILED: {STALE_REASON}")
    elif stale:
        print(f"{len(runs)} stale job run(s); `kdray runs --stale --close` marks them FAILED "
              f"(`kdray run CONFIG --resume` continues one)")
    return 0


def add_parser(subparsers) -> None:
    runs = subparsers.add_parser("runs", help="list job runs; --stale finds runs whose driver is gone")
    runs.add_argument("--store", default=None, help="tracking URI (default: MLFLOW_TRACKING_URI or ./mlflow.db)")
    runs.add_argument("--experiment", default=None, help="only this experiment (default: all)")
    runs.add_argument("--stale", action="store_true",
                      help="only RUNNING job runs whose driver process on this host no longer exists")
    runs.add_argument("--close", action="store_true", help="mark the stale runs FAILED (implies --stale)")
    runs.add_argument("--max", type=int, default=50, help="most runs to list (default 50)")
    runs.set_defaults(func=_cmd_runs)
