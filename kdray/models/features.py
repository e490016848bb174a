"""Intermediate features by module path, captured with forward hooks (never by rewriting the model).

A path is resolved once against ``model.named_modules()`` when the tap is built, so a typo fails at
construction with the nearest valid paths rather than deep inside a training step.
"""
from __future__ import annotations

import contextlib
import difflib

import torch
import torch.nn as nn


class FeaturePathError(ValueError):
    """A feature point that the model does not have."""


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / FSDP-style wrappers (they keep it as ``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def resolve_points(model: nn.Module, points: list[str], role: str = "model") -> dict[str, nn.Module]:
    """Map each module path to its module, or raise naming the bad path and the nearest valid ones."""
    modules = dict(unwrap(model).named_modules())
    resolved = {}
    for path in points:
        if path not in modules:
            close = difflib.get_close_matches(path, [m for m in modules if m], n=5, cutoff=0.4)
            hint = f"nearest valid paths: {', '.join(close)}" if close else "see model.named_modules()"
            raise FeaturePathError(f"{role} has no module {path!r}; {hint}")
        resolved[path] = modules[path]
    return resolved


def default_points(model: nn.Module, which: str, role: str = "model") -> list[str]:
    """The model's declared feature points: ``stages`` (``kd_stages``) or ``embedding`` (``kd_embedding``)."""
    inner = unwrap(model)
    if which == "stages":
        points = getattr(inner, "kd_stages", None)
    elif which == "embedding":
        emb = getattr(inner, "kd_embedding", None)
        points = [emb] if emb else None
    else:
        raise ValueError(f"unknown feature-point group {which!r}; allowed: stages, embedding")
    if not points:
        raise FeaturePathError(
            f"{role} ({type(inner).__name__}) declares no default {which} feature points; "
            f"give the module paths explicitly (e.g. student_points: [layer1, layer2])"
        )
    return list(points)


class FeatureTap:
    """Forward hooks on named modules; ``with tap.capture() as feats: model(x)`` fills ``feats[path]``."""

    def __init__(self, model: nn.Module, points: list[str], role: str = "model"):
        self.points = list(dict.fromkeys(points))
        self._modules = resolve_points(model, self.points, role)
        self._store: dict[str, torch.Tensor] | None = None
        self._handles = [m.register_forward_hook(self._hook(p)) for p, m in self._modules.items()]

    def _hook(self, path):
        def fn(_module, _inputs, output):
            if self._store is not None:
                self._store[path] = output

        return fn

    @contextlib.contextmanager
    def capture(self):
        self._store = {}
        try:
            yield self._store
        finally:
            self._store = None

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []
