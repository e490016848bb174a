"""self: the network teaches itself, as born-again generations (each taught by the previous, then their
ensemble evaluated) or as BYOT auxiliary exits."""
from __future__ import annotations

from kdray.algorithms.schemes.byot import BYOTDistiller
from kdray.orchestrator.online import evaluate_generation_ensembles
from kdray.orchestrator.plan import Scheme, from_stage, no_teacher, register_scheme, stage


@register_scheme
class SelfDistill(Scheme):
    name = "self"
    help = "the network teaches itself: born-again generations or BYOT exits (self_distill.method)"
    sections = ("self_distill",)

    def check(self, cfg):
        no_teacher(cfg)

    def plan(self, cfg):
        """Per seed [scratch] + born-again generations (each taught by the previous) or BYOT."""
        student = ("student", cfg.student.model)
        stages = []
        for seed in cfg.seeds:
            if cfg.baseline:
                stages.append(stage(f"scratch-seed{seed}", "scratch", seed, *student))
            if cfg.self_distill.method == "byot":
                stages.append(stage(f"byot-seed{seed}", "byot", seed, *student))
                continue
            previous = None
            for gen in range(cfg.self_distill.generations):
                name = f"gen{gen}-seed{seed}"
                kind = "generation" if gen else "scratch"
                stages.append(stage(name, kind, seed, *student, [from_stage(previous)] if previous else None,
                                    keep=True, generation=gen))
                previous = name
        return stages

    def finish_inputs(self, cfg, stages):
        """Born-again: every generation (rows and weights); BYOT has no finish step."""
        return [s.name for s in stages if s.generation is not None] if cfg.self_distill.method == "born_again" else []

    def finish(self, cfg, stages, splits, ctx, job_state):
        """The test accuracy of the ensemble of all generations, on each seed's last generation row."""
        evaluate_generation_ensembles(cfg, stages, splits, ctx, job_state)

    def preflight(self, cfg, splits, example, student, teachers, orders):
        if cfg.self_distill.method == "byot":
            BYOTDistiller(student).build(example, None, len(splits.train))
