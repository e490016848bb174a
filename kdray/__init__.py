"""kdray: distributed knowledge distillation on Ray, tracked in MLflow."""
from kdray.config import Config, ConfigError, load_config

__version__ = "0.1.0"


def distill(config, **kwargs):
    """Run a distillation job; see :func:`kdray.orchestrator.api.distill`."""
    from kdray.orchestrator.api import distill as _distill

    return _distill(config, **kwargs)


from kdray.search import sweep  # noqa: E402  (light import: Ray, Optuna, MLflow load when a sweep runs)

__all__ = ["Config", "ConfigError", "distill", "load_config", "__version__"]
