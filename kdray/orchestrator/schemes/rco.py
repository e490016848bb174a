"""rco (Jin et al. ICCV 2019, route-constrained optimisation): the teacher's training route as a curriculum.

A converged teacher is a hard target for a small student; the teacher's earlier states are easier ones. RCO
keeps the teacher's weights at chosen epochs of its training (the anchors) and distils the student from
anchor 1, then anchor 2, ..., then the final teacher, each stage starting from the student the previous one
left. The paper picks anchors at equal epoch intervals (its "EEI" strategy) or greedily; kdray takes the epochs
as given (``rco.anchors``). The paper keeps the optimisation running across anchors; kdray restarts the
optimizer and schedule per stage (each stage is one training run, one MLflow child run, resumable alone).

Stages: ``teacher`` (kept, plus its weights after each anchor epoch as ``teacher@epoch<N>``), then per seed
[``scratch``], ``rco-seed<S>-anchor<k>`` (kind ``rco_anchor``, ``rco.epochs_per_anchor`` epochs, taught by
``teacher@epoch<anchors[k]>``) and ``rco-seed<S>`` (kind ``rco``, ``train.epochs``, taught by the final teacher).
"""
from __future__ import annotations

from kdray.algorithms.engine import TrainLoop
from kdray.orchestrator.build import check_distiller_builds
from kdray.orchestrator.job import complete_stage, prepare_stage
from kdray.orchestrator.plan import (Scheme, from_stage, method_label, needs_methods, needs_teacher,
                                     register_scheme, scratch_baseline, stage)
from kdray.orchestrator.weights import load_weights

TEACHER = "teacher"
ANCHOR_KIND, FINAL_KIND = "rco_anchor", "rco"


def anchor_name(epoch: int) -> str:
    """The job-state name of the teacher's weights after ``epoch`` epochs."""
    return f"{TEACHER}@epoch{epoch}"


class KeepAnchors:
    """Teacher epoch callback: copies the model's weights after each anchor epoch into the job state (before
    the checkpointer runs, so a checkpoint taken at that epoch holds them and a resumed teacher keeps them)."""

    def __init__(self, model, anchors: list[int], weights: dict):
        self.model, self.anchors, self.weights = model, set(anchors), weights

    def on_epoch_end(self, epoch, metrics, loop):
        if epoch + 1 in self.anchors:
            self.weights[anchor_name(epoch + 1)] = {k: v.detach().cpu().clone()
                                                    for k, v in self.model.state_dict().items()}


@register_scheme
class RCO(Scheme):
    name = "rco"
    help = ("RCO: the teacher's checkpoints at rco.anchors epochs teach the student in turn, then the final teacher "
            "(rco: {anchors: [epochs], epochs_per_anchor})")
    sections = ("teacher", "rco")
    own_stage_kinds = (TEACHER, ANCHOR_KIND, FINAL_KIND)

    def check(self, cfg):
        needs_teacher(cfg)
        needs_methods(cfg)
        spec, teacher = cfg.rco, cfg.teacher
        if teacher.cache is not None:
            raise ValueError("scheme 'rco' distils from the teacher's training checkpoints; a teacher cache holds "
                             "only the final teacher's outputs: give teacher.train")
        if teacher.train is None:
            raise ValueError("scheme 'rco' needs the teacher's training checkpoints (anchors), which a teacher given "
                             "as checkpoint / mlflow_uri has none of: give teacher.train")
        if not spec.anchors:
            raise ValueError("scheme 'rco' needs rco.anchors: the teacher epochs whose weights teach first "
                             "(e.g. rco: {anchors: [2, 4]})")
        if spec.anchors[-1] >= teacher.train.epochs:
            raise ValueError(f"rco.anchors: epoch {spec.anchors[-1]} is not before the teacher's last epoch "
                             f"(teacher.train.epochs: {teacher.train.epochs}); the final teacher always teaches "
                             f"last, give earlier epochs")
        if cfg.ray.stage_tasks:
            raise ValueError("scheme 'rco' runs its stages in one Ray Train run (anchors are kept inside the teacher "
                             "stage): set ray.stage_tasks: false")

    def plan(self, cfg):
        """teacher (+ anchors) -> per seed [scratch] + one student stage per anchor + the final-teacher stage."""
        stages = [stage(TEACHER, TEACHER, cfg.seeds[0], TEACHER, cfg.teacher.model, keep=True)]
        label = method_label(cfg)
        for seed in cfg.seeds:
            for extra in scratch_baseline(cfg):
                stages.append(stage(f"{extra.name}-seed{seed}", extra.kind, seed, "student", cfg.student.model))
            for k, epoch in enumerate(cfg.rco.anchors):
                stages.append(stage(f"rco-seed{seed}-anchor{k}", ANCHOR_KIND, seed, "student", cfg.student.model,
                                    [from_stage(anchor_name(epoch))], keep=True, methods=label))
            stages.append(stage(f"rco-seed{seed}", FINAL_KIND, seed, "student", cfg.student.model,
                                [from_stage(TEACHER)], methods=label))
        return stages

    def preflight(self, cfg, splits, example, student, teachers, orders):
        check_distiller_builds(cfg, example, student, teachers[:1], orders[:1], len(splits.train))

    def run_stage(self, cfg, stage, splits, ctx, job_state, resume_loop):
        if stage.kind == TEACHER:
            parts = prepare_stage(cfg, stage, splits, ctx, job_state)
            parts.callbacks.insert(0, KeepAnchors(parts.model, cfg.rco.anchors, job_state.weights))
            loop = TrainLoop(**parts.loop_kwargs(splits, ctx))
            return complete_stage(cfg, stage, splits, ctx, job_state, parts, loop, resume_loop)
        if stage.kind == ANCHOR_KIND and cfg.rco.epochs_per_anchor is not None:
            train = cfg.train.model_copy(update={"epochs": cfg.rco.epochs_per_anchor})
            cfg = cfg.model_copy(update={"train": train})
        parts = prepare_stage(cfg, stage, splits, ctx, job_state)
        previous = previous_student(cfg, stage)
        if previous is not None:  # the student the previous anchor left (the route continues from there)
            load_weights(parts.model, job_state.weights[previous], f"stage {previous}", splits.num_classes)
        loop = TrainLoop(**parts.loop_kwargs(splits, ctx))
        return complete_stage(cfg, stage, splits, ctx, job_state, parts, loop, resume_loop)


def previous_student(cfg, current) -> str | None:
    """The name of the anchor stage before ``current`` for its seed (``None`` for the first anchor)."""
    earlier = None
    for s in RCO().plan(cfg):
        if s.name == current.name:
            return earlier
        if s.kind == ANCHOR_KIND and s.seed == current.seed:
            earlier = s.name
    raise KeyError(current.name)
