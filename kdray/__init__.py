"""kdray: distributed knowledge distillation on Ray, tracked in MLflow.

The package imports lazily (PEP 562): ``import kdray.algorithms`` (pure PyTorch) must not pay for pydantic,
Ray, MLflow or Optuna, so the public names below load their modules on first use.
"""
import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "Config": "kdray.config",
    "ConfigError": "kdray.config",
    "load_config": "kdray.config",
    "sweep": "kdray.search",
    "block_search": "kdray.search.blockwise",
}


def distill(config, **kwargs):
    """Run a distillation job; see :func:`kdray.orchestrator.api.distill`."""
    from kdray.orchestrator.api import distill as _distill

    return _distill(config, **kwargs)


def __getattr__(name):
    """Load ``Config``, ``ConfigError``, ``load_config``, ``sweep`` and ``block_search`` when first asked for, and cache them."""
    if name not in _LAZY:
        raise AttributeError(f"module 'kdray' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["Config", "ConfigError", "block_search", "distill", "load_config", "__version__"]
