"""Distillation algorithms in pure PyTorch: knowledge terms, the distiller, schemes and the loop.

Nothing here imports Ray or MLflow, so every method runs in a plain unit test; the orchestrator
places this work on Ray and supplies callbacks for checkpoints and tracking.
"""
from kdray.algorithms.base import (
    Batch,
    KnowledgeTerm,
    ModelOutput,
    UnknownMethodError,
    create_method,
    get_method,
    list_methods,
    register_method,
)

__all__ = [
    "Batch",
    "KnowledgeTerm",
    "ModelOutput",
    "UnknownMethodError",
    "create_method",
    "get_method",
    "list_methods",
    "register_method",
]
