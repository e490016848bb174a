"""The sweep file: ``name``, ``output_dir``, ``base`` (a job config), ``space`` and ``search`` settings.

::

    name: digits-sweep
    base: digits                 # a job YAML, a packaged example, or an inline mapping;
                                 # an inline mapping may say ``extends: digits`` and override keys of it
    space: {...}                 # see kdray.search.space
    search:
      num_samples: 20
      objectives: [val_top1:max, params:min]
      sampler: nsga2             # tpe | nsga2 | random | grid
      asha: {grace_period: auto, max_t: auto, reduction_factor: 3}   # null: no early stopping
      seeds: [0, 1, 2]           # per configuration; default: the base config's seeds
      max_concurrent: auto       # from the cluster's CPUs
      workers_per_trial: 0       # 0: in-process trials; N: a TorchTrainer with N workers per trial
"""
from __future__ import annotations

import copy
import math
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kdray.config import ConfigError, check_job_name, format_error, packaged_examples, read_yaml

#: Objective metrics a trial reports, with their natural direction.
OBJECTIVES = {"val_top1": "max", "params": "min", "latency_ms": "min"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AshaSpec(_Strict):
    """Asynchronous successive halving on ``val_top1`` per epoch. ``auto``: ``max_t`` is the most epochs
    a trial can train; ``grace_period`` is ``max_t / reduction_factor**2`` (rounded up), at least the
    longest warm-up of the methods in play (DKD's ``warmup``, FitNet's ``hint_epochs``), at most ``max_t``."""

    grace_period: int | Literal["auto"] = "auto"
    max_t: int | Literal["auto"] = "auto"
    reduction_factor: float = Field(3.0, gt=1)

    @field_validator("grace_period", "max_t")
    @classmethod
    def _positive(cls, v):
        if v != "auto" and v < 1:
            raise ValueError(f"must be >= 1 epoch or 'auto', got {v}")
        return v


class SearchSpec(_Strict):
    num_samples: int | None = Field(20, gt=0)
    objectives: list[str] = Field(default_factory=lambda: ["val_top1:max"], min_length=1)
    sampler: Literal["tpe", "nsga2", "random", "grid"] = "tpe"
    population_size: int | None = Field(None, ge=2)
    n_startup_trials: int | None = Field(None, ge=1)
    seed: int | None = 0
    asha: AshaSpec | None = Field(default_factory=AshaSpec)
    seeds: list[int] | int | None = None
    max_concurrent: int | Literal["auto"] = "auto"
    workers_per_trial: int = Field(0, ge=0)
    base_workers: int | None = Field(None, ge=0)  # the base job's Ray Train workers; default workers_per_trial
    cpus_per_trial: float = Field(1.0, gt=0)
    reevaluate: int = Field(8, ge=0)
    register_model: bool = True
    model_name: str | None = None
    latency_batch: int = Field(1, gt=0)
    verbose: int = Field(0, ge=0, le=2)  # Tune's own output; kdray prints one line per finished trial

    @field_validator("objectives", mode="before")
    @classmethod
    def _objectives(cls, value):
        if isinstance(value, str):
            value = [value]
        if isinstance(value, dict):
            value = [f"{k}:{v}" for k, v in value.items()]
        out = []
        for item in value:
            metric, _, mode = str(item).partition(":")
            metric = metric.strip()
            if metric not in OBJECTIVES:
                raise ValueError(f"unknown objective {metric!r}; allowed: {', '.join(OBJECTIVES)}")
            mode = (mode.strip() or OBJECTIVES[metric])
            if mode not in ("max", "min"):
                raise ValueError(f"objective {metric!r}: mode must be max or min, got {mode!r}")
            out.append(f"{metric}:{mode}")
        if len({o.split(':')[0] for o in out}) != len(out):
            raise ValueError(f"an objective is listed twice: {out}")
        if not out or out[0].split(":")[0] != "val_top1":
            raise ValueError("the first objective must be val_top1 (ASHA and the best trial use it)")
        return out

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value):
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise ValueError(f"seeds: a count must be >= 1, got {value}")
            return list(range(value))
        if isinstance(value, list) and len(set(value)) != len(value):
            raise ValueError(f"seeds must be distinct, got {value}")
        if isinstance(value, list) and not value:
            raise ValueError("seeds: give at least one")
        return value

    @property
    def metrics(self) -> list[str]:
        return [o.split(":")[0] for o in self.objectives]

    @property
    def modes(self) -> list[str]:
        return [o.split(":")[1] for o in self.objectives]

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1


class SweepSpec(_Strict):
    name: str = "kdray-sweep"
    output_dir: str | None = None
    base: str | dict[str, Any]
    space: dict[str, Any]
    search: SearchSpec = Field(default_factory=SearchSpec)

    @field_validator("name", mode="before")
    @classmethod
    def _one_directory(cls, name: Any) -> str:
        return check_job_name(name)  # the sweep's files go to <output_dir>/<name>/


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("args", "options"):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def base_raw(base: str | dict, where_dir: str | None = None) -> dict:
    """The base job config as a raw dict: a YAML path (relative to the sweep file), a packaged example,
    or a mapping (``extends:`` another base and overrides its keys)."""
    if isinstance(base, str):
        path = base
        if where_dir and not os.path.isabs(path) and base not in packaged_examples():
            candidate = os.path.join(where_dir, path)
            path = candidate if os.path.isfile(candidate) else path
        return read_yaml(path)
    if not isinstance(base, dict):
        raise ConfigError(f"base: give a job config file, a packaged example ({', '.join(packaged_examples())}) "
                          f"or a mapping, got {type(base).__name__}")
    base = dict(base)
    parent = base.pop("extends", None)
    if parent is None:
        return base
    return _deep_merge(base_raw(parent, where_dir), base)


def load_sweep_spec(source: str | dict, overrides: list[str] | None = None) -> tuple[SweepSpec, str | None]:
    """Read a sweep YAML (path) or dict; apply ``key.path=value`` overrides; validate. Returns the spec and
    the directory relative paths in it are resolved against."""
    from kdray.config import apply_overrides

    where = None
    if isinstance(source, str):
        if not os.path.isfile(source):
            name = source.removesuffix(".yaml")
            if name in packaged_examples():
                raw = read_yaml(name)
            else:
                raise ConfigError(f"sweep config {source!r} is neither a file nor a packaged example")
        else:
            raw = read_yaml(source)
            where = os.path.dirname(os.path.abspath(source))
    else:
        raw = copy.deepcopy(source)
    if "space" not in raw or "base" not in raw:
        missing = [k for k in ("base", "space") if k not in raw]
        raise ConfigError(f"sweep config: missing {', '.join(missing)} (a sweep file has base:, space:, search:)")
    raw = apply_overrides(raw, overrides or [])
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_error(err)) from None
    return spec, where


def auto_grace(max_t: int, reduction_factor: float, warmup: int) -> int:
    return int(min(max_t, max(1, math.ceil(max_t / reduction_factor ** 2), warmup)))
