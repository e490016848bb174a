"""A real Ray head for the tests that need one (``ray job submit``), started with ``ray start``.

The head gets its own temp dir and ports, so the test session's own Ray (``ray_session``, started with
``address="local"``) neither joins it nor is touched by it; it is stopped by the process ids of that temp
dir (and their children), never with ``ray stop``, which would kill every Ray on the machine. The
``ray_head`` fixture is registered in conftest.py.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

START_TIMEOUT_S = 90
JOB_TIMEOUT_S = 240


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
               RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS="0")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_range(size: int) -> int:
    """First port of ``size`` consecutive free ports below the ephemeral range."""
    for _ in range(200):
        base = random.randrange(20000, 32000 - size)
        try:
            for port in range(base, base + size):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port range")


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line), from /proc."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out[int(entry)] = (ppid, cmd)
    return out


def head_pids(temp_dir: str) -> set[int]:
    """The processes of the Ray started in ``temp_dir`` (GCS, raylet, dashboard, ...) and all their children."""
    procs = _processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = set(), [pid for pid, (_, cmd) in procs.items() if temp_dir in cmd]
    while stack:
        pid = stack.pop()
        if pid not in found:
            found.add(pid)
            stack += children.get(pid, [])
    found.discard(os.getpid())
    return found


def stop_head(temp_dir: str, grace_s: float = 3.0) -> set[int]:
    pids = head_pids(temp_dir)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") and _alive(p) for p in pids):
            time.sleep(0.1)
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.fixture
def ray_head():
    """A Ray head on 127.0.0.1 with its own temp dir and ports; yields the job server's address."""
    temp_dir = tempfile.mkdtemp(prefix="kdray-head-", dir="/tmp")  # short: Ray's socket paths must fit
    dashboard_port = _free_port()
    workers = _free_range(64)
    ports = {"--port": _free_port(), "--dashboard-port": dashboard_port,
             "--ray-client-server-port": _free_port(), "--min-worker-port": workers,
             "--max-worker-port": workers + 63, "--dashboard-agent-listen-port": _free_port(),
             "--dashboard-agent-grpc-port": _free_port(), "--runtime-env-agent-port": _free_port(),
             "--metrics-export-port": _free_port(), "--node-manager-port": _free_port(),
             "--object-manager-port": _free_port()}
    cmd = ["ray", "start", "--head", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
           "--include-dashboard", "true", "--temp-dir", temp_dir, "--num-cpus", "2",
           "--object-store-memory", str(200 * 2**20), "--disable-usage-stats"]
    for flag, port in ports.items():
        cmd += [flag, str(port)]
    try:
        started = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=START_TIMEOUT_S)
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        yield f"http://127.0.0.1:{dashboard_port}", temp_dir
    finally:
        stopped = stop_head(temp_dir)
        leftover = [p for p in stopped if _alive(p)]
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leftover, f"head processes still alive: {leftover}"


def ray_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["ray", *args], env=_env(), capture_output=True, text=True, timeout=timeout)
