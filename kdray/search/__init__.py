"""Search (Ray Tune + Optuna): turns a search space over student architecture and distillation
hyper-parameters plus a base config into Tune trials (TPE / NSGA-II sampler, ASHA early stopping),
each trial a distillation run from the engine, each tracked as a nested MLflow run.

``sweep(space, base_config, num_samples=..., ...)`` runs a search and returns a :class:`SweepResult`
(best configuration, Pareto set, DataFrame of trials); ``sweep_file(path)`` runs a sweep YAML
(``kdray sweep CONFIG.yaml``). Spaces: :mod:`kdray.search.space`; the sweep file: :mod:`kdray.search.spec`.
"""
from kdray.search.api import SweepResult, sweep, sweep_file

__all__ = ["SweepResult", "sweep", "sweep_file"]
