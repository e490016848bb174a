"""Picking one pair of feature points for the methods that distil a single layer (ICKD, CWD, PAD, ...)."""
from __future__ import annotations

from kdray.algorithms.base import KnowledgeTerm, ModelOutput
from kdray.algorithms.feature.connectors import FeaturePair, feature_pairs, shape_error


def pick_pair(term: KnowledgeTerm, student: ModelOutput, teacher: ModelOutput, index: int,
              need_map: bool = False) -> FeaturePair:
    """The ``index``-th pair of points (``-1``: the last), checked by :func:`feature_pairs`; with
    ``need_map=True`` both raw features must be ``(B, C, H, W)`` maps."""
    pairs = feature_pairs(term, student, teacher)
    try:
        pair = pairs[index]
    except IndexError:
        raise ValueError(f"{term.name}.feature_index={index} is out of range for student points "
                         f"{list(term.student_points)} and teacher points {list(term.teacher_points)}") from None
    if need_map:
        s_raw, t_raw = student.features[pair.student_path], teacher.features[pair.teacher_path]
        if s_raw.dim() != 4 or t_raw.dim() != 4:
            raise shape_error(term.name, pair.student_path, s_raw, pair.teacher_path, t_raw,
                              "this method needs (B, C, H, W) maps at both points")
    return pair
