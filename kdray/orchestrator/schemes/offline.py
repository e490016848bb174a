"""offline: a trained teacher teaches the student (the classic KD setting)."""
from __future__ import annotations

from kdray.orchestrator.build import check_distiller_builds
from kdray.orchestrator.plan import (Scheme, methods_need_teacher, needs_methods, needs_teacher, no_cache_with_views,
                                     register_scheme, taught_students, teacher_sources)


@register_scheme
class Offline(Scheme):
    name = "offline"
    help = "a trained teacher teaches the student (teacher: train | checkpoint | mlflow_uri | cache)"
    sections = ("teacher",)
    searched_kind = "distill"

    def check(self, cfg):
        if not cfg.methods or methods_need_teacher(cfg):  # self-distilling terms alone (cs_kd, mean_teacher) need none
            needs_teacher(cfg)
        needs_methods(cfg)
        no_cache_with_views(cfg)

    def plan(self, cfg):
        """[teacher] -> per seed [scratch] + the distilled student."""
        stages: list = []
        return taught_students(cfg, stages, teacher_sources(cfg, stages))

    def preflight(self, cfg, splits, example, student, teachers, orders):
        check_distiller_builds(cfg, example, student, teachers[:1], orders[:1], len(splits.train))
