"""Models by name, in the style of timm's ``create_model``: one function builds any registered model.

Builders register with :func:`register_model`; ``create_model`` falls back to torchvision's
classification models so any of them can be a teacher or student by its torchvision name.
"""
from __future__ import annotations

import difflib
import fnmatch
import inspect
from typing import Callable

import torch.nn as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_FAMILY: dict[str, str] = {}


class UnknownModelError(ValueError):
    """A model name that neither kdray nor torchvision knows."""


def register_model(name: str | None = None, family: str = "other"):
    """Decorator: register a builder ``fn(num_classes=..., **knobs) -> nn.Module`` under ``name``."""

    def wrap(fn):
        key = name or fn.__name__
        if key in _MODELS:
            raise ValueError(f"model {key!r} is registered twice")
        _MODELS[key] = fn
        _FAMILY[key] = family
        return fn

    return wrap


def _torchvision_names() -> list[str]:
    from torchvision import models as tvm

    return sorted(tvm.list_models(module=tvm))


def list_models(pattern: str = "*", include_torchvision: bool = False) -> list[str]:
    """Registered model names matching a shell-style ``pattern`` (``resnet*``, ``wrn_*``)."""
    names = sorted(_MODELS)
    if include_torchvision:
        names += [f"torchvision.{n}" for n in _torchvision_names()]
    return [n for n in names if fnmatch.fnmatch(n, pattern)]


def model_family(name: str) -> str:
    return _FAMILY.get(name, "torchvision" if name.startswith("torchvision.") else "unknown")


def model_knobs(name: str) -> list[str]:
    """Keyword knobs a registered builder accepts besides ``num_classes``."""
    if name not in _MODELS:
        return []
    params = inspect.signature(_MODELS[name]).parameters
    return [p for p in params if p != "num_classes"]


def is_known_model(name: str) -> bool:
    if name in _MODELS:
        return True
    if name.startswith("torchvision."):
        return name.split(".", 1)[1] in _torchvision_names()
    return False


def create_model(name: str, num_classes: int, **knobs) -> nn.Module:
    """Build model ``name`` for ``num_classes`` classes; ``torchvision.<name>`` builds a torchvision model."""
    if name in _MODELS:
        builder = _MODELS[name]
        allowed = set(inspect.signature(builder).parameters)
        unknown = set(knobs) - allowed
        if unknown:
            raise TypeError(
                f"model {name!r} has no knob(s) {sorted(unknown)}; allowed: {sorted(allowed - {'num_classes'})}"
            )
        return builder(num_classes=num_classes, **knobs)
    if name.startswith("torchvision."):
        from torchvision import models as tvm

        tv_name = name.split(".", 1)[1]
        if tv_name in _torchvision_names():
            return tvm.get_model(tv_name, weights=None, num_classes=num_classes, **knobs)
    close = difflib.get_close_matches(name, list(_MODELS), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise UnknownModelError(
        f"unknown model {name!r}{hint} (see `kdray list models`; torchvision models as 'torchvision.<name>')"
    )
