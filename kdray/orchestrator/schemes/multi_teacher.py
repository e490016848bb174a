"""multi_teacher: M teachers, combined into one ensemble, teach the student."""
from __future__ import annotations

from kdray.orchestrator.build import check_distiller_builds
from kdray.orchestrator.plan import Scheme, needs_methods, register_scheme, taught_students, teacher_sources


@register_scheme
class MultiTeacher(Scheme):
    name = "multi_teacher"
    help = ("M teachers combined by mean | weights | confidence | random, one connector per teacher "
            "for feature methods (teachers: [...], ensemble.combine)")
    sections = ("teachers", "ensemble")

    def check(self, cfg):
        needs_methods(cfg)
        if len(cfg.teachers) < 2:
            raise ValueError(f"scheme 'multi_teacher' needs at least 2 teachers, got {len(cfg.teachers)}")
        if cfg.teacher is not None:
            raise ValueError("scheme 'multi_teacher' takes teachers: [...], not teacher:")
        w = cfg.ensemble.weights
        if cfg.ensemble.combine == "weights" and (w is None or len(w) != len(cfg.teachers)):
            raise ValueError(f"ensemble.weights needs one weight per teacher ({len(cfg.teachers)}), got {w}")

    def plan(self, cfg):
        """[teachers] -> per seed [scratch] + the student taught by their ensemble."""
        stages: list = []
        return taught_students(cfg, stages, teacher_sources(cfg, stages))

    def preflight(self, cfg, splits, example, student, teachers, orders):
        """Every teacher's feature points and connector shapes (one connector per teacher)."""
        check_distiller_builds(cfg, example, student, teachers, orders, len(splits.train))
