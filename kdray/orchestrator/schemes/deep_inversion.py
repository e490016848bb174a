"""deep_inversion: the teacher's training images are never shown to the student. Images are synthesised from the
teacher alone (DeepInversion, :mod:`kdray.algorithms.datafree.inversion`), written as a Parquet image set
(:mod:`kdray.data.image_parquet`) in the job's directory, and the students are distilled on that set, evaluated on
the real val/test splits. With ``deep_inversion.noise_baseline`` a second student is distilled on as many noise
images, the floor the synthetic set must beat.

The synthesis stage is split across the job's workers: worker ``r`` of ``W`` makes every ``W``-th image with its
own seed and writes its own part file, so ``W`` workers synthesise ``W`` times faster; the set is the union of the
parts. Any offline job can train on the written set later: ``data: {name: image_parquet, root: <part file>}``.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from kdray.algorithms.datafree.inversion import InversionSettings, synthesize
from kdray.data import DatasetSplits, IndexedDataset, read_image_parquet, write_image_parquet
from kdray.orchestrator.build import build_teacher_model, check_distiller_builds, teacher_class_order
from kdray.orchestrator.job import train_stage
from kdray.orchestrator.plan import (Scheme, method_label, needs_methods, needs_teacher, register_scheme, stage,
                                     teacher_sources)
from kdray.orchestrator.run_dir import Checkpoint

SYNTHESIS = "inversion"
SETS = {"inverted": "inversion", "noise": "noise"}  # student stage kind -> the image set it trains on


@register_scheme
class DeepInversion(Scheme):
    name = "deep_inversion"
    help = ("data-free: images synthesised from the teacher's BatchNorm statistics (DeepInversion), the student "
            "distilled on them (deep_inversion: images_per_class, steps, ...; noise-input baseline)")
    sections = ("teacher", "deep_inversion")
    own_stage_kinds = (SYNTHESIS, *SETS)

    def check(self, cfg):
        needs_teacher(cfg)
        needs_methods(cfg)
        if cfg.teacher.cache is not None:
            raise ValueError("scheme 'deep_inversion' synthesises through the live teacher; a teacher cache holds "
                             "only its outputs on real images: give teacher.train, checkpoint or mlflow_uri")

    def plan(self, cfg):
        """[teacher] -> the synthesis -> per seed [scratch (real data)] [noise student] + the inverted student."""
        stages: list = []
        sources = teacher_sources(cfg, stages)
        stages.append(stage(SYNTHESIS, SYNTHESIS, cfg.seeds[0], "teacher", cfg.teacher.model, sources))
        for seed in cfg.seeds:
            if cfg.baseline:
                stages.append(stage(f"scratch-seed{seed}", "scratch", seed, "student", cfg.student.model))
            kinds = ["noise", "inverted"] if cfg.deep_inversion.noise_baseline else ["inverted"]
            for kind in kinds:
                stages.append(stage(f"{kind}-{method_label(cfg)}-seed{seed}", kind, seed, "student",
                                    cfg.student.model, sources, methods=method_label(cfg)))
        return stages

    def run_stage(self, cfg, stage, splits, ctx, job_state, resume_loop):
        if stage.kind == SYNTHESIS:
            return synthesize_stage(cfg, stage, splits, ctx, job_state)
        return train_stage(cfg, stage, synthetic_splits(cfg, splits, SETS[stage.kind]), ctx, job_state, resume_loop)

    def preflight(self, cfg, splits, example, student, teachers, orders):
        from kdray.algorithms.datafree.losses import BatchNormStatistics

        BatchNormStatistics(teachers[0]).remove()  # a teacher without BatchNorm: one line, before training
        if len(splits.input_shape) != 3:
            raise ValueError(f"scheme 'deep_inversion' synthesises images (channels, height, width); dataset "
                             f"{cfg.data.name!r} has inputs of shape {tuple(splits.input_shape)}")
        check_distiller_builds(cfg, example, student, teachers[:1], orders[:1], len(splits.train))


def set_dir(cfg, name: str) -> str:
    return os.path.join(cfg.run_dir(), "deep_inversion", name)


def synthesize_stage(cfg, stage, splits, ctx, job_state) -> dict:
    """This worker's share of the inverted images (and of the noise set), one part file per worker and set."""
    spec = cfg.deep_inversion
    source = stage.teachers[0]
    teacher = build_teacher_model(cfg, source, splits.num_classes, job_state.weights, ctx.tracking_uri).to(ctx.device)
    order = teacher_class_order(cfg, source, splits.classes)
    labels = torch.arange(splits.num_classes).repeat(spec.images_per_class)[ctx.rank::ctx.world_size]
    wanted = labels if order is None else torch.tensor(order)[labels]  # the teacher's own index of each class
    seed = 1_000_003 * stage.seed + ctx.rank
    settings = InversionSettings(spec.steps, spec.lr, spec.bn_weight, spec.tv_weight, spec.l2_weight)
    images = synthesize(teacher, wanted, tuple(splits.input_shape), settings, torch.Generator().manual_seed(seed)).cpu()
    with torch.no_grad():
        teacher.eval()
        hit = (teacher(images.to(ctx.device)).argmax(1).cpu() == wanted).float().mean().item()
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed + 1))
    for name, x in (("inversion", images), ("noise", noise)):
        write_image_parquet(os.path.join(set_dir(cfg, name), f"part-{ctx.rank:04d}.parquet"), x, labels,
                            splits.classes)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # every part is written before any student reads the set
    result = {**stage.row(), "images": len(labels) * ctx.world_size, "teacher_agreement": hit,
              "test_top1": float("nan")}
    job_state.done[stage.name] = result
    if ctx.rank == 0 and ctx.tracking_uri and stage.name in ctx.stage_run_ids:
        from kdray.orchestrator.plots import image_grid
        from kdray.orchestrator.tracking import StageLogger

        shown = slice(0, min(len(images), 4 * splits.num_classes))
        StageLogger(ctx.tracking_uri, ctx.stage_run_ids[stage.name]).finish_without_model(
            {"teacher_agreement": hit, "images": result["images"]},
            {"synthetic_images.png": image_grid(images[shown], labels[shown], splits.classes)})
    ctx.checkpoints.save(Checkpoint(job_state, stage.name).to_payload(), {"stage": stage.name})
    return result


def synthetic_splits(cfg, real: DatasetSplits, name: str) -> DatasetSplits:
    """The image set ``name`` (every worker's part) as the training split; val/test stay the real ones."""
    folder = set_dir(cfg, name)
    parts = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".parquet"))
    loaded = [read_image_parquet(p) for p in parts]
    images = torch.cat([x for x, _, _ in loaded])
    labels = torch.cat([y for _, y, _ in loaded])
    train = IndexedDataset(torch.utils.data.TensorDataset(images, labels))
    return DatasetSplits(train, real.val, real.test, real.num_classes, real.input_shape,
                         f"{real.fingerprint}:{name}:{len(images)}", real.classes)
