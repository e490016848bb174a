"""assistant (TAKD): teacher -> assistant 1 -> ... -> the student, each taught by the previous model."""
from __future__ import annotations

from kdray.orchestrator.build import check_distiller_builds
from kdray.orchestrator.plan import (Scheme, from_stage, method_label, needs_methods,
                                     needs_teacher, register_scheme, stage, taught_students, teacher_sources)


@register_scheme
class Assistant(Scheme):
    name = "assistant"
    help = "TAKD: teacher -> assistants -> student, each taught by the previous (assistants: [...])"
    sections = ("teacher", "assistants")

    def check(self, cfg):
        needs_teacher(cfg)
        needs_methods(cfg)
        if not cfg.assistants:
            raise ValueError("scheme 'assistant' needs assistants: [{model: ...}, ...] "
                             "(teacher -> assistants -> student)")

    def plan(self, cfg):
        stages: list = []
        sources = teacher_sources(cfg, stages)
        for i, spec in enumerate(cfg.assistants):
            name = f"assistant-{i}"
            stages.append(stage(name, "assistant", cfg.seeds[0], f"assistants.{i}", spec.model, sources,
                                keep=True, methods=method_label(cfg)))
            sources = [from_stage(name)]
        return taught_students(cfg, stages, sources)

    def models(self, cfg):
        return [(f"assistants.{i}", spec) for i, spec in enumerate(cfg.assistants)]

    def preflight(self, cfg, splits, example, student, teachers, orders):
        check_distiller_builds(cfg, example, student, teachers[:1], orders[:1], len(splits.train))
