"""Pareto dominance over objectives given as ``(metric, mode)`` pairs (``mode`` is ``max`` or ``min``)."""
from __future__ import annotations

from typing import Sequence


def dominates(a: Sequence[float], b: Sequence[float], modes: Sequence[str]) -> bool:
    """``a`` is at least as good as ``b`` in every objective and strictly better in one."""
    better = False
    for x, y, mode in zip(a, b, modes):
        if mode == "min":
            x, y = -x, -y
        if x < y:
            return False
        if x > y:
            better = True
    return better


def pareto_mask(points: Sequence[Sequence[float]], modes: Sequence[str]) -> list[bool]:
    """For each point, whether no other point dominates it (duplicates all stay on the front)."""
    return [not any(dominates(q, p, modes) for j, q in enumerate(points) if j != i) for i, p in enumerate(points)]


def dominated_by_any(point: Sequence[float], others: Sequence[Sequence[float]], modes: Sequence[str]) -> bool:
    return any(dominates(q, point, modes) for q in others)
