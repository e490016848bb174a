"""cross_modal: a teacher trained on modality A teaches a student that sees only modality B of the same paired,
mostly unlabelled samples (Gupta, Hoffman & Malik 2016, supervision transfer).

The dataset's inputs are a mapping of modalities (``data: {name: digits_two_views}``: ``image`` and ``profile``);
``cross_modal: {teacher_input, student_input, labelled_fraction, labelled_sampling}`` names who reads what.
Plan: [the teacher, trained on the whole labelled training split in ``teacher_input``, unless given by
checkpoint / MLflow] -> per seed [``labelled``: the student trained on the seed's ``labelled_fraction`` of the
training split alone, in ``student_input``: the baseline] + the ``cross_modal`` student, taught on *all* paired
training samples (knowledge terms on every sample, the hard-label CE on the labelled ones only; the same labelled
subset as the seed's baseline). The baseline takes as many optimizer steps as the taught student (its epochs are
scaled up by the ratio of steps per epoch, :func:`matched_steps`), so it is not cut short by its ~10x smaller
epochs. Validation and test read the student's modality.

Stages that read one modality train through the generic :func:`~kdray.orchestrator.job.train_stage` on a
one-modality view of the splits (:func:`~kdray.data.two_views.view_splits`, still device-pipeline friendly); the
cross-modal stage is assembled here from the common builders (its distiller and teacher each pick their own
modality of the paired batch, :mod:`kdray.algorithms.schemes.cross_modal`) and finished by
:func:`~kdray.orchestrator.job.complete_stage` (checkpoints, resume, MLflow as every stage's). Its training batches
come from the per-sample loader (a mapping of modalities is not a device-pipeline split).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
from torch.utils.data import Subset

from kdray.algorithms.base import Batch
from kdray.algorithms.distiller import Teacher
from kdray.algorithms.engine import seed_everything
from kdray.algorithms.precision import to_channels_last
from kdray.algorithms.schemes.cross_modal import (UNLABELLED, CrossModalDistiller, CrossModalLoop, ModalityTeacher,
                                                  labelled_mask)
from kdray.data import IndexedDataset
from kdray.data.two_views import split_targets, view_splits
from kdray.models import create_model
from kdray.orchestrator.build import build_optimizer, build_teacher, build_terms, example_batch, worker_cpus
from kdray.orchestrator.job import StageParts, complete_stage, stage_logging, train_stage
from kdray.orchestrator.placement import make_loaders
from kdray.orchestrator.plan import (SeedStage, Scheme, matched_steps, needs_live_teacher, needs_methods,
                                     register_scheme, taught_students, teacher_sources)


def check_modalities(cfg, inputs) -> None:
    """One line when the dataset's inputs are not a mapping holding both configured modalities."""
    spec = cfg.cross_modal
    if not isinstance(inputs, Mapping):
        raise ValueError(f"scheme 'cross_modal' needs a dataset whose inputs are a mapping of modalities (e.g. "
                         f"data.name: digits_two_views); dataset {cfg.data.name!r} gives one tensor")
    for key in ("teacher_input", "student_input"):
        name = getattr(spec, key)
        if name not in inputs:
            raise ValueError(f"cross_modal.{key}: dataset {cfg.data.name!r} has no modality {name!r}; its "
                             f"modalities are {', '.join(map(repr, inputs))}")


def labelled_subset(cfg, splits, seed: int) -> torch.Tensor:
    """The training samples whose label the seed's students may use (bool mask over the training split)."""
    spec = cfg.cross_modal
    return labelled_mask(split_targets(splits.train), spec.labelled_fraction, seed,
                         stratified=spec.labelled_sampling == "stratified")


@register_scheme
class CrossModal(Scheme):
    name = "cross_modal"
    help = ("a teacher on one modality teaches a student on another of the same paired samples, most unlabelled "
            "(cross_modal: teacher_input, student_input, labelled_fraction); baseline = the labelled ones alone")
    sections = ("teacher", "cross_modal")
    own_stage_kinds = ("teacher", "labelled", "cross_modal")
    searched_kind = "cross_modal"  # a sweep scores the taught student (its preflight routes the modalities)

    def check(self, cfg):
        needs_live_teacher(cfg, "its own modality of each paired batch")
        needs_methods(cfg)

    def check_data(self, cfg, splits):
        check_modalities(cfg, splits.train[0][0] if len(splits.train) else None)

    def plan(self, cfg):
        """[teacher] -> per seed [labelled-only baseline] + the cross-modal student."""
        stages: list = []
        baselines = [SeedStage("labelled", "labelled")] if cfg.baseline else []
        return taught_students(cfg, stages, teacher_sources(cfg, stages), kind="cross_modal", baselines=baselines)

    def model_inputs(self, cfg, path, inputs):
        check_modalities(cfg, inputs)
        spec = cfg.cross_modal
        return inputs[spec.student_input if path == "student" else spec.teacher_input]

    def preflight(self, cfg, splits, example, student, teachers, orders):
        check_modalities(cfg, example)
        spec = cfg.cross_modal
        own = example[spec.student_input]
        try:
            with torch.no_grad():
                classes = student.eval()(own).shape[1]
        except (RuntimeError, ValueError, TypeError) as err:
            raise ValueError(f"student ({cfg.student.model}) cannot read cross_modal.student_input "
                             f"{spec.student_input!r} of shape {tuple(own.shape[1:])}: "
                             f"{str(err).splitlines()[0]}") from None
        if classes != splits.num_classes:
            raise ValueError(f"the student outputs {classes} classes but dataset {cfg.data.name!r} has "
                             f"{splits.num_classes}")
        distiller = CrossModalDistiller(student, build_terms(cfg), cfg.ce_weight, spec.student_input)
        teacher = ModalityTeacher(Teacher(teachers[0], distiller.resolve_teacher_points(teachers[0]), orders[0]),
                                  spec.teacher_input)
        distiller.build(example, teacher, len(splits.train))
        # One step's losses on unlabelled rows only: a method that needs labels beyond a CE fails here, not mid-run.
        targets = torch.full((len(own),), UNLABELLED, dtype=torch.long)
        try:
            distiller(Batch(example, targets, torch.arange(len(own))), teacher(example))
        except (RuntimeError, IndexError, ValueError) as err:
            raise ValueError(f"methods {[m.name for m in cfg.methods]} cannot train on unlabelled paired samples "
                             f"(cross_modal): {str(err).splitlines()[0]}") from None

    def run_stage(self, cfg, stage, splits, ctx, job_state, resume_loop):
        spec = cfg.cross_modal
        if stage.kind == "teacher":
            return train_stage(cfg, stage, view_splits(splits, spec.teacher_input), ctx, job_state, resume_loop)
        labelled = labelled_subset(cfg, splits, stage.seed)
        if stage.kind == "labelled":
            own = view_splits(splits, spec.student_input)
            kept = IndexedDataset(Subset(own.train, torch.nonzero(labelled).flatten().tolist()))
            return train_stage(matched_steps(cfg, len(splits.train), len(kept)), stage, replace(own, train=kept),
                               ctx, job_state, resume_loop)
        parts = prepare_paired_stage(cfg, stage, splits, ctx, job_state)
        loop = CrossModalLoop(labelled=labelled, **parts.loop_kwargs(splits, ctx))
        return complete_stage(cfg, stage, splits, ctx, job_state, parts, loop, resume_loop,
                              {"labelled_samples": int(labelled.sum()), "paired_samples": len(splits.train)})


def prepare_paired_stage(cfg, stage, splits, ctx, job_state) -> StageParts:
    """:func:`~kdray.orchestrator.job.prepare_stage` for a paired stage: the student's distiller reads
    ``student_input``, the teacher ``teacher_input`` of the same batch; training batches hold every modality
    (per-sample loader), validation and test the student's only. ``example`` is the student's (what MLflow logs)."""
    spec, optim = cfg.cross_modal, cfg.train
    seed_everything(stage.seed)
    model = create_model(cfg.student.model, splits.num_classes, **cfg.student.args)
    distiller = CrossModalDistiller(model, build_terms(cfg), cfg.ce_weight, spec.student_input)
    teacher = ModalityTeacher(build_teacher(cfg, stage, distiller, splits.num_classes, job_state.weights, ctx,
                                            classes=splits.classes), spec.teacher_input)
    paired = replace(view_splits(splits, spec.student_input), train=splits.train)
    train_loader, val_loader, test_loader = make_loaders(paired, optim.batch_size, stage.seed, ctx,
                                                         cfg.data.loader_workers, pipeline="per_sample",
                                                         cpus=worker_cpus(cfg))
    example = example_batch(splits.train)
    distiller.build(example, teacher, len(splits.train))
    distiller.to(ctx.device)
    teacher.to(ctx.device)
    if optim.channels_last:  # before the DDP wrap, as prepare_stage does
        to_channels_last(distiller)
        to_channels_last(teacher)
    trainable = ctx.wrap(distiller)
    optimizer, scheduler = build_optimizer((p for p in trainable.parameters() if p.requires_grad), optim)
    logger, callbacks = stage_logging(cfg, stage, ctx, job_state, optim.epochs)
    return StageParts(cfg.student, optim, model, distiller, trainable, teacher, train_loader, val_loader,
                      test_loader, example[spec.student_input], optimizer, scheduler, logger, callbacks)
