"""data_free: the student learns from a trained teacher without a training image (DAFL, DFAD, ZSKT).

A generator, trained against the frozen teacher, makes the student's batches; validation and test still use
the real splits. Per seed the plan has the student taught on pure Gaussian noise (``data_free.noise_baseline``,
the floor a generator must beat) and the data-free student; the teacher stage (when the teacher is trained
in the job) and the scratch baseline read the real training split, as in the offline scheme. The mathematics
are :mod:`kdray.algorithms.datafree`; this module builds the generator and runs the loop through the common
stage machinery (:func:`~kdray.orchestrator.job.prepare_stage` / ``complete_stage``).
"""
from __future__ import annotations

import torch

from kdray.algorithms.datafree.generator import Generator, check_generator
from kdray.algorithms.datafree.loop import DataFreeLoop
from kdray.models.features import FeatureTap, default_points
from kdray.orchestrator.build import check_distiller_builds
from kdray.orchestrator.job import complete_stage, prepare_stage
from kdray.orchestrator.plan import (SeedStage, Scheme, needs_live_teacher, needs_methods, register_scheme,
                                     scratch_baseline, taught_students, teacher_sources)


def build_generator(cfg, input_shape: tuple[int, ...]) -> Generator:
    """DAFL's generator for images of the teacher's ``input_shape`` (``data_free.channels`` / ``image_size``
    override it; preflight then says when they disagree)."""
    spec = cfg.data_free
    return Generator(spec.latent_dim, spec.channels or input_shape[0], spec.image_size or input_shape[-1],
                     spec.generator_width)


class LogGeneratedImages:
    """Epoch-end callback (rank 0, where a stage logs): the epoch's last generated batch as an image grid in
    the stage's MLflow run, each image titled with the teacher's class for it, so the user sees what the
    generator learnt to draw and whether the teacher reads it as the class it was meant to be."""

    def __init__(self, logger, classes: list[str], shown: int = 40):
        self.logger, self.classes, self.shown = logger, classes, shown

    def on_epoch_end(self, epoch, metrics, loop):
        if loop.last_images is None:
            return
        from kdray.orchestrator.plots import image_grid

        images = loop.last_images[:self.shown]
        with torch.no_grad():
            labels = loop.teacher_forward(images).logits.argmax(1)
        self.logger.log_epoch_figure(epoch, image_grid(images, labels, self.classes))


def attention_points(cfg) -> tuple[list[str], list[str]] | None:
    """ZSKT's (student, teacher) block paths from the config; ``None``: each model's declared stages."""
    points = cfg.data_free.attention_points
    return None if points is None else (points["student"], points["teacher"])


def check_attention_points(cfg, example: torch.Tensor, student, teacher) -> None:
    """ZSKT's attention compares spatial maps: every block pair must give ``(B, C, H, W)`` features, as many
    on each side; else one line naming the point and its shape (before any training)."""
    given = attention_points(cfg)
    models = {"student": student, "teacher": teacher}
    points = dict(zip(models, given)) if given else {r: default_points(m, "stages", r) for r, m in models.items()}
    if len(points["student"]) != len(points["teacher"]):
        raise ValueError(f"data_free.attention_points pairs blocks one to one: student {points['student']}, "
                         f"teacher {points['teacher']}")
    for role, model in models.items():
        tap = FeatureTap(model, points[role], role)
        was_training = model.training
        model.eval()
        with torch.no_grad(), tap.capture() as feats:
            model(example)
        model.train(was_training)
        tap.remove()
        for path in points[role]:
            if feats[path].dim() != 4:
                raise ValueError(f"ZSKT's attention needs spatial feature maps (B, C, H, W), but the {role}'s "
                                 f"point {path!r} gives {tuple(feats[path].shape[1:])} per sample; name convolutional "
                                 f"blocks in data_free.attention_points or set attention_weight: 0")


@register_scheme
class DataFree(Scheme):
    name = "data_free"
    help = ("a generator replaces the training images: DAFL, DFAD or ZSKT (data_free.method), plus a "
            "Gaussian-noise student baseline")
    sections = ("teacher", "data_free")
    searched_kind = "data_free"
    search_settings = {"data_free": {"noise_baseline": False}}  # trials skip the noise baseline
    own_stage_kinds = ("data_free", "noise")

    def check(self, cfg):
        needs_live_teacher(cfg, "generated images")
        needs_methods(cfg)

    def plan(self, cfg):
        """[teacher] -> per seed [scratch] + [noise] + the data-free student."""
        stages: list = []
        baselines = scratch_baseline(cfg)
        if cfg.data_free.noise_baseline:
            baselines.append(SeedStage("noise", "noise", taught=True))
        return taught_students(cfg, stages, teacher_sources(cfg, stages), kind="data_free",
                               name=cfg.data_free.method, baselines=baselines)

    def preflight(self, cfg, splits, example, student, teachers, orders):
        check_distiller_builds(cfg, example, student, teachers[:1], orders[:1], len(splits.train))
        input_shape = tuple(example.shape[1:])
        check_generator(build_generator(cfg, input_shape), input_shape, cfg.data_free.latent_dim)
        if cfg.data_free.attention_weight:
            check_attention_points(cfg, example, student, teachers[0])

    def run_stage(self, cfg, stage, splits, ctx, job_state, resume_loop):
        spec = cfg.data_free
        parts = prepare_stage(cfg, stage, splits, ctx, job_state)
        input_shape = tuple(parts.example.shape[1:])
        generator = optimizer = None
        method = "noise" if stage.kind == "noise" else spec.method
        if method != "noise":
            torch.manual_seed(stage.seed)  # the same initial generator on every worker and placement
            generator = build_generator(cfg, input_shape)
            check_generator(generator, input_shape, spec.latent_dim)
            generator = ctx.wrap(generator.to(ctx.device))
            optimizer = torch.optim.Adam(generator.parameters(), lr=spec.generator_lr)
        if parts.logger is not None and method != "noise":
            parts.callbacks.insert(0, LogGeneratedImages(parts.logger, splits.classes))
        student_steps = spec.student_steps if method in ("dfad", "zskt") else 1
        loop = DataFreeLoop(method=method, generator=generator, generator_optimizer=optimizer,
                            noise_seed=(stage.seed, ctx.rank), input_shape=input_shape,
                            steps_per_epoch=spec.steps_per_epoch, batch_size=spec.batch_size,
                            student_steps=student_steps, generator_steps=spec.generator_steps, alpha=spec.alpha,
                            beta=spec.beta, input_mean=spec.input_mean, input_std=spec.input_std,
                            attention_weight=spec.attention_weight if method == "zskt" else 0.0,
                            attention_points=attention_points(cfg), **parts.loop_kwargs(splits, ctx))
        return complete_stage(cfg, stage, splits, ctx, job_state, parts, loop, resume_loop,
                              {"data_free_method": method})
