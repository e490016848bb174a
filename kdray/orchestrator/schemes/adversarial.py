"""adversarial: the student learns to fool a discriminator that tells its outputs from the teacher's (Xu et al.
2018; MEAL-V2, Shen & Savvides 2020, with ``adversarial.preset: meal_v2`` and several teachers).

One teacher (``teacher:``) or an ensemble (``teachers:`` + ``ensemble:``) teaches per seed [scratch] + the
adversarially distilled student. The stage is the generic one (:func:`~kdray.orchestrator.job.prepare_stage`
/ :func:`~kdray.orchestrator.job.complete_stage`) around an
:class:`~kdray.algorithms.schemes.adversarial.AdversarialLoop`, so checkpoints, resume, progress and MLflow
logging are every stage's; the discriminator and its Adam ride in the loop's checkpointed state.
"""
from __future__ import annotations

import torch

from kdray.algorithms.schemes.adversarial import AdversarialLoop, FeatureDiscriminator, LogitDiscriminator, pool
from kdray.config import MethodSpec
from kdray.models.features import FeatureTap, resolve_points
from kdray.orchestrator.build import check_distiller_builds
from kdray.orchestrator.job import complete_stage, prepare_stage
from kdray.orchestrator.plan import (Scheme, method_label, needs_methods, register_scheme, taught_students,
                                     teacher_sources)

MEAL_V2_METHODS = [{"name": "kd", "alpha": 1.0, "temperature": 1.0}]


def apply_meal_v2(cfg) -> None:
    """MEAL-V2's recipe as defaults: the teachers' mean, no hard labels, KL at temperature 1, the logit
    discriminator beside it. A setting given in the config that contradicts it is a one-line error.

    Departure: MEAL-V2 averages the teachers' softmax probabilities; kdray's ``ensemble.combine: mean`` averages
    their logits (the normalised geometric mean of the distributions, see
    :mod:`kdray.algorithms.schemes.multi_teacher`), so the KD term is unchanged. MEAL-V2 also starts the student
    from pre-trained weights and trains for long: that is the ``student`` / ``train``
    sections' business, not the preset's."""
    spec, given = cfg.adversarial, cfg.model_fields_set
    if spec.conditional:
        raise ValueError("adversarial.preset: meal_v2 uses an unconditional discriminator; remove conditional or "
                         "the preset")
    if spec.on != "logits" or spec.mode != "beside":
        raise ValueError(f"adversarial.preset: meal_v2 uses on: logits, mode: beside (got on: {spec.on}, "
                         f"mode: {spec.mode}); remove them or the preset")
    if "ce_weight" in given and cfg.ce_weight != 0:
        raise ValueError(f"adversarial.preset: meal_v2 trains without hard labels (ce_weight 0), got ce_weight: "
                         f"{cfg.ce_weight}; remove ce_weight or the preset")
    if "methods" in given and [m.model_dump() for m in cfg.methods] != MEAL_V2_METHODS:
        raise ValueError("adversarial.preset: meal_v2 sets methods: [{name: kd, alpha: 1, temperature: 1}]; "
                         "remove methods or the preset")
    if cfg.ensemble.combine != "mean":
        raise ValueError(f"adversarial.preset: meal_v2 averages the teachers (ensemble.combine: mean), got "
                         f"{cfg.ensemble.combine!r}; remove it or the preset")
    cfg.__dict__["ce_weight"] = 0.0
    cfg.__dict__["methods"] = [MethodSpec(**m) for m in MEAL_V2_METHODS]


@register_scheme
class Adversarial(Scheme):
    name = "adversarial"
    help = ("a discriminator tells teacher from student outputs (logits or a feature point) and the student "
            "learns to fool it, beside or instead of its methods; preset meal_v2 (adversarial: ...)")
    sections = ("teacher", "teachers", "ensemble", "adversarial")
    searched_kind = "adversarial"
    own_stage_kinds = ("adversarial",)

    def check(self, cfg):
        spec = cfg.adversarial
        if cfg.teacher is not None and cfg.teachers:
            raise ValueError("scheme 'adversarial' takes teacher: (one) or teachers: [...] (an ensemble), not both")
        if cfg.teacher is None and not cfg.teachers:
            raise ValueError("scheme 'adversarial' needs a teacher (teacher: {model, train|checkpoint|mlflow_uri}) "
                             "or teachers: [...]")
        if spec.on == "feature" and (len(cfg.teachers) > 1 or (cfg.teacher is not None and cfg.teacher.cache)):
            raise ValueError("adversarial.on: feature needs one live teacher (teacher: without cache); an ensemble "
                             "or a cache gives logits only: use on: logits")
        if spec.preset == "meal_v2":
            apply_meal_v2(cfg)
        if spec.mode == "instead":
            if "methods" in cfg.model_fields_set and cfg.methods:
                raise ValueError("adversarial.mode: instead trains on CE + the fool loss alone; remove methods "
                                 "(or use mode: beside)")
            cfg.__dict__["methods"] = []
        else:
            needs_methods(cfg)

    def plan(self, cfg):
        """[teachers] -> per seed [scratch] + the adversarially taught student."""
        stages: list = []
        label = "+".join(filter(None, [method_label(cfg), "adversarial"]))
        return taught_students(cfg, stages, teacher_sources(cfg, stages), kind="adversarial", methods=label)

    def preflight(self, cfg, splits, example, student, teachers, orders):
        check_distiller_builds(cfg, example, student, teachers, orders, len(splits.train))
        if cfg.adversarial.on == "feature":
            resolve_points(student, [cfg.adversarial.feature], "student")
            resolve_points(teachers[0], [cfg.adversarial.feature], "teacher")

    def run_stage(self, cfg, stage, splits, ctx, job_state, resume_loop):
        parts = prepare_stage(cfg, stage, splits, ctx, job_state)
        spec = cfg.adversarial
        taps = {}
        if spec.on == "feature":
            taps = dict(student_tap=FeatureTap(parts.model, [spec.feature], "student"),
                        teacher_tap=FeatureTap(parts.teacher.model, [spec.feature], "teacher"))
            widths = []
            with torch.no_grad():
                for tap, model in ((taps["student_tap"], parts.model), (taps["teacher_tap"], parts.teacher.model)):
                    was_training = model.training
                    model.eval()
                    with tap.capture() as feats:
                        model(parts.example.to(ctx.device))
                    model.train(was_training)
                    widths.append(pool(feats[spec.feature]).shape[1])
            discriminator = FeatureDiscriminator(widths[0], widths[1], spec.hidden,
                                                 splits.num_classes if spec.conditional else 0)
        else:
            discriminator = LogitDiscriminator(splits.num_classes, spec.hidden, spec.conditional)
        discriminator = ctx.wrap(discriminator.to(ctx.device))
        disc_optimizer = torch.optim.Adam(discriminator.parameters(), lr=spec.lr, betas=tuple(spec.betas))
        loop = AdversarialLoop(discriminator=discriminator, disc_optimizer=disc_optimizer, weight=spec.weight,
                               d_steps=spec.d_steps, on=spec.on, **taps, **parts.loop_kwargs(splits, ctx))
        return complete_stage(cfg, stage, splits, ctx, job_state, parts, loop, resume_loop)
