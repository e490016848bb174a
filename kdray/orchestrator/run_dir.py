"""A job's directory, ``<output_dir>/<name>/``: what is in it, which config made it, and who drives it.

Storage layer (no MLflow, no Ray). Three promises:

- **One config per job directory.** The resolved config that started the job is saved as ``config.json``
  (atomically) before anything is trained. ``--resume`` with a config that differs from it in a key that
  can change results is refused in one line listing the differing keys, so one job directory never mixes
  the results of two configurations (a ``--resume`` with another student size used to finish the job with
  a results table mixing both). Keys that cannot change results are :data:`RESULT_NEUTRAL_KEYS`.
- **One driver per job directory.** :class:`JobLock` is an advisory ``flock`` on ``.kdray.lock``, held for the
  whole of ``distill``: a second driver fails at once, naming the first one's pid and host (two drivers used to
  both train everything and leave two FINISHED job runs). The OS drops a ``flock`` when its holder exits, even
  on SIGKILL, so a crashed driver never leaves the job locked. The file is never deleted: unlinking a lock
  file lets two processes lock two different inodes of "the same" file.
- **Atomic writes**: a crash leaves the old file or the new one, never half of one.
- **One checkpoint payload.** :class:`Checkpoint` (a :class:`JobState` plus the stage in progress and its loop
  state) is what every runner writes and every reader reads; on disk it is a plain dict of tensors, numbers
  and strings (``torch.load(weights_only=True)`` reads it, never unpickling code). The layout of checkpoints
  (``checkpoint/state.pt``, one ``stages/<stage>/state.pt`` per stage task, Ray Train's ``checkpoint_*``) is
  :class:`RunDir`'s.

:func:`file_lock` is the same ``flock``, blocking, for short critical sections (creating a local MLflow store).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Iterator

from kdray.config import ConfigError

CONFIG_FILE = "config.json"
LOCK_FILE = ".kdray.lock"
RUNS_FILE = "mlflow_runs.json"  # the job's MLflow run ids (written by the tracking layer)
STATE_FILE = "state.pt"  # one checkpoint (torch.save of Checkpoint.to_payload())
CHECKPOINT_DIR = "checkpoint"  # in-process jobs: <run_dir>/checkpoint/state.pt
STAGES_DIR = "stages"  # stage tasks: <run_dir>/stages/<stage>/state.pt
RAY_CHECKPOINTS = "checkpoint_*"  # Ray Train's checkpoint directories, each holding a state.pt

#: Dotted config keys (and everything under them) that cannot change what a job computes, so ``--resume``
#: accepts a change in them. Each entry says why; a key not listed here is compared:
#:
#: - ``name``, ``output_dir``: they locate the job directory, which is the same one by construction.
#: - ``ray.address``: which cluster runs the same workers; ``ray.max_failures``: how many restarts (each resumes
#:   from a checkpoint, and resume is exact); ``ray.start_timeout_s``: how long to wait for resources.
#: - ``checkpoint.every_epochs``, ``checkpoint.keep``: where checkpoints fall and how many are kept; resuming
#:   from any of them reproduces the uninterrupted run.
#: - ``data.download``: whether missing files are fetched; the data itself is named by ``data.name``/``root``.
#: - ``mlflow.tracking_uri``: where runs are recorded, not what is trained. Its spelling varies (relative, via
#:   ``MLFLOW_TRACKING_URI``), so the resolved store is checked against ``mlflow_runs.json`` instead.
#: - ``mlflow.system_metrics``: CPU / memory / GPU telemetry only.
#:
#: Compared on purpose: ``ray.num_workers`` (the per-worker batch and data shards), ``ray.use_gpu`` (another
#: device, other kernels), ``ray.cpus_per_worker`` (torch's thread count changes floating-point reduction
#: order), ``ray.stage_tasks`` (another checkpoint layout), ``data.loader_workers`` (random augmentations in
#: DataLoader workers draw from per-worker seeds, not the main process's generator), ``mlflow.enabled`` and
#: ``mlflow.experiment`` (a resumed job keeps its runs where they are; a change there would be ignored silently).
RESULT_NEUTRAL_KEYS: tuple[str, ...] = (
    "name", "output_dir",
    "ray.address", "ray.max_failures", "ray.start_timeout_s",
    "checkpoint.every_epochs", "checkpoint.keep",
    "data.download",
    "mlflow.tracking_uri", "mlflow.system_metrics",
)

_MISSING = object()


class JobLockedError(ConfigError):
    """Another live driver holds the job's lock."""


def write_atomic(path: str, write: Callable[[IO[bytes]], None], suffix: str = "") -> None:
    """Call ``write(file)`` on a temp file beside ``path``, fsync it and rename it over ``path``, so a crash
    leaves either the old or the new file, never half of one."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(obj: Any, path: str) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (:func:`write_atomic`)."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
    write_atomic(path, lambda fh: fh.write(text), suffix=".json")


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    """Dotted paths to leaves; list items by index (``methods.0.name``)."""
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(value, list) and value:
        for i, v in enumerate(value):
            _flatten(v, f"{prefix}.{i}", out)
    else:
        out[prefix] = value
    return out


def _neutral(key: str, neutral: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in neutral)


def config_changes(saved: dict, current: dict,
                   neutral: tuple[str, ...] = RESULT_NEUTRAL_KEYS) -> list[tuple[str, Any, Any]]:
    """``(dotted key, saved value, current value)`` for every leaf that differs, except result-neutral keys."""
    old, new = _flatten(saved, "", {}), _flatten(current, "", {})
    keys = [k for k in dict.fromkeys([*old, *new]) if not _neutral(k, neutral)]
    return [(k, old.get(k, _MISSING), new.get(k, _MISSING)) for k in keys
            if old.get(k, _MISSING) != new.get(k, _MISSING)]


def describe_changes(changes: list[tuple[str, Any, Any]], shown: int = 3) -> str:
    """``a.b: 16 -> 32, c: kd -> dkd (+4 more)``: a few changes, then how many more, for a one-line message."""
    def fmt(v: Any) -> str:
        text = "(unset)" if v is _MISSING else v if isinstance(v, str) else json.dumps(v, default=str)
        return text if len(text) <= 40 else text[:37] + "..."

    text = ", ".join(f"{k}: {fmt(a)} -> {fmt(b)}" for k, a, b in changes[:shown])
    return text + (f" (+{len(changes) - shown} more)" if len(changes) > shown else "")


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing), waiting for it; released on exit."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


class JobLock:
    """The one-driver-per-job lock (see the module docstring). The file records the holder's pid, host and
    start time, for the second driver's message; it is emptied again when the holder releases it."""

    def __init__(self, run_dir: str, job: str):
        self.path, self.job, self.run_dir = os.path.join(run_dir, LOCK_FILE), job, run_dir
        self._fd: int | None = None

    def acquire(self) -> None:
        os.makedirs(self.run_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JobLockedError(f"job {self.job!r} in {self.run_dir} is being run by another driver "
                                 f"({self._holder()}); wait for it to end, or choose another name=") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

    def _holder(self) -> str:
        """Who holds the lock; it writes its record just after locking, so wait a moment for it."""
        for _ in range(20):
            try:
                with open(self.path) as fh:
                    info = json.loads(fh.read() or "null")
            except (OSError, ValueError):
                info = None
            if isinstance(info, dict):
                return f"pid {info.get('pid')} on host {info.get('host')}, since {info.get('since')}"
            time.sleep(0.05)
        return f"pid unknown; see {self.path}"

    def __enter__(self) -> JobLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@dataclass
class JobState:
    """What a job has finished: each stage's result row (``done``), and the weights of the stages that later
    stages or the scheme's finish step read (``weights``, by stage name)."""

    done: dict[str, dict] = field(default_factory=dict)
    weights: dict[str, dict] = field(default_factory=dict)


@dataclass
class Checkpoint:
    """One checkpoint: the job state, the stage in progress and its training-loop state (``loop``; ``None``
    once that stage finished), and which process wrote it (``writer``, stage tasks only)."""

    state: JobState = field(default_factory=JobState)
    stage: str | None = None
    loop: dict | None = None
    writer: dict | None = None

    def to_payload(self) -> dict:
        """The plain dict stored in ``state.pt`` (read back with ``weights_only=True``)."""
        payload = {"done": self.state.done, "weights": self.state.weights, "stage": self.stage, "loop": self.loop}
        if self.writer is not None:
            payload["writer"] = self.writer
        return payload

    @classmethod
    def from_payload(cls, payload: dict | None) -> "Checkpoint":
        """A checkpoint from a stored payload (``None``: a job that has not checkpointed yet)."""
        payload = payload or {}
        state = JobState(dict(payload.get("done", {})), dict(payload.get("weights", {})))
        return cls(state, payload.get("stage"), payload.get("loop"), payload.get("writer"))

    def resume_loop(self, stage: str) -> dict | None:
        """The loop state to resume ``stage`` from, if this checkpoint was taken inside it."""
        return self.loop if self.stage == stage else None

    def finished(self, stage: str) -> bool:
        """Whether ``stage`` finished (its result row written at its end, no loop in progress)."""
        return self.loop is None and stage in self.state.done


def read_checkpoint(path: str) -> Checkpoint | None:
    """The checkpoint in ``path`` (``None`` when there is none): tensors and plain values only."""
    import torch

    if not os.path.exists(path):
        return None
    return Checkpoint.from_payload(torch.load(path, map_location="cpu", weights_only=True))


class RunDir:
    """The on-disk layout of one job: checkpoints, the MLflow run ids, the saved config and the lock."""

    def __init__(self, path: str, job: str):
        self.path, self.job = path, job

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def check_writable(self) -> None:
        """The job directory, or its nearest existing parent, must be a writable directory."""
        existing = self.path
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"output_dir: cannot write {self.path} ({existing} is not a writable directory)")

    def has_results(self) -> bool:
        """Whether the job has run: MLflow runs recorded or a checkpoint (in-process, stage tasks, Ray Train)."""
        if not os.path.isdir(self.path):
            return False
        names = os.listdir(self.path)
        return RUNS_FILE in names or CHECKPOINT_DIR in names or STAGES_DIR in names or any(
            n.startswith(RAY_CHECKPOINTS.rstrip("*")) for n in names)

    def lock(self) -> JobLock:
        return JobLock(self.path, self.job)

    def checkpoint_file(self) -> str:
        """An in-process job's checkpoint."""
        return os.path.join(self.path, CHECKPOINT_DIR, STATE_FILE)

    def stage_file(self, stage: str) -> str:
        """A stage task's own checkpoint (``ray.stage_tasks``)."""
        return os.path.join(self.path, STAGES_DIR, stage, STATE_FILE)

    def finished_stage(self, stage: str) -> Checkpoint | None:
        """A stage task's checkpoint once that stage finished, else ``None``."""
        checkpoint = read_checkpoint(self.stage_file(stage))
        return checkpoint if checkpoint is not None and checkpoint.finished(stage) else None

    def latest_checkpoint(self) -> Checkpoint | None:
        """The job's newest checkpoint: the in-process one, else Ray Train's newest ``checkpoint_*``."""
        import glob

        local = read_checkpoint(self.checkpoint_file())
        if local is not None:
            return local
        found = sorted(glob.glob(os.path.join(self.path, RAY_CHECKPOINTS, STATE_FILE)), key=os.path.getmtime)
        return read_checkpoint(found[-1]) if found else None

    def saved_config(self) -> dict | None:
        try:
            with open(self.file(CONFIG_FILE)) as fh:
                saved = json.load(fh)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise ConfigError(f"{self.file(CONFIG_FILE)} is unreadable ({err}); restore it, or choose another "
                              f"name=") from None
        return saved if isinstance(saved, dict) else None

    def save_config(self, config: dict) -> None:
        write_json_atomic(config, self.file(CONFIG_FILE))

    def tracked_in(self) -> str | None:
        """The MLflow store the job's runs are in, from ``mlflow_runs.json``; None when it has none."""
        try:
            with open(self.file(RUNS_FILE)) as fh:
                return json.load(fh).get("uri")
        except (OSError, ValueError, AttributeError):
            return None

    def check_same_config(self, current: dict, normalize=None) -> None:
        """Refuse (one line) to resume with a config whose results could differ from the saved one's.

        ``normalize`` re-validates the saved config with today's schema, so keys added to kdray since the job
        started compare at their defaults; when the saved config no longer validates it is compared as saved.
        """
        saved = self.saved_config()
        if saved is None:
            return
        if normalize is not None:
            try:
                saved = normalize(saved)
            except (ValueError, TypeError):
                pass
        changes = config_changes(saved, current)
        if changes:
            raise ConfigError(f"job {self.job!r} in {self.path} was made by another config "
                              f"({describe_changes(changes)}); resume with the same config, or choose another name=")
