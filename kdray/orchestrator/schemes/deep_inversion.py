"""deep_inversion: the teacher's training images are never shown to the student. Images are synthesised from the
teacher alone (DeepInversion, :mod:`kdray.algorithms.datafree.inversion`), written as a Parquet image set
(:mod:`kdray.data.image_parquet`) in the job's directory, and the students are distilled on that set, evaluated on
the real val/test splits. With ``deep_inversion.noise_baseline`` a second student is distilled on as many noise
images, the floor the synthetic set must beat.

The synthesis stage is split across the job's workers: worker ``r`` of ``W`` makes every ``W``-th image with its
own seed and writes its own part file, so ``W`` workers synthesise ``W`` times faster; the set is the union of the
parts. Any offline job can train on the written set later: ``data: {name: image_parquet, root: <part file>}``.

Adaptive DeepInversion (``deep_inversion.competition_weight > 0``, Yin et al.'s ADI) adds two stages after the
plain synthesis, which then makes ``1 - adaptive_fraction`` of the images: a ``competitor`` student (the
configured student, distilled on those images like any student stage) and ``inversion-adaptive``, which
synthesises the rest with the competition term against the competitor, into the same set. Departure: the paper
alternates synthesis and distillation batch by batch; kdray runs one such round (each a checkpointed stage).
"""
from __future__ import annotations

import dataclasses
import functools
import os

import torch
import torch.distributed as dist

from kdray.algorithms.datafree.inversion import InversionSettings, synthesize
from kdray.data import DatasetSplits, IndexedDataset, read_image_parquet, write_image_parquet
from kdray.orchestrator.build import build_teacher_model, check_distiller_builds, teacher_class_order
from kdray.orchestrator.job import train_stage
from kdray.orchestrator.plan import (Scheme, method_label, needs_live_teacher, needs_methods, register_scheme, stage,
                                     teacher_sources)
from kdray.orchestrator.run_dir import Checkpoint

SYNTHESIS = "inversion"
ADAPTIVE = "inversion_adaptive"  # Adaptive DeepInversion's round against the competitor
COMPETITOR = "competitor"
SETS = {"inverted": "inversion", "noise": "noise", COMPETITOR: "inversion"}  # student kind -> its image set


@register_scheme
class DeepInversion(Scheme):
    name = "deep_inversion"
    help = ("data-free: images synthesised from the teacher's BatchNorm statistics (DeepInversion), the student "
            "distilled on them (deep_inversion: images_per_class, steps, ...; noise-input baseline)")
    sections = ("teacher", "deep_inversion")
    searched_kind = "inverted"
    search_settings = {"deep_inversion": {"noise_baseline": False}}  # trials skip the noise baseline
    own_stage_kinds = (SYNTHESIS, ADAPTIVE, *SETS)

    def check(self, cfg):
        needs_live_teacher(cfg, "images it synthesises")
        needs_methods(cfg)

    def plan(self, cfg):
        """[teacher] -> the synthesis -> per seed [scratch (real data)] [noise student] + the inverted student."""
        stages: list = []
        sources = teacher_sources(cfg, stages)
        stages.append(stage(SYNTHESIS, SYNTHESIS, cfg.seeds[0], "teacher", cfg.teacher.model, sources))
        if cfg.deep_inversion.competition_weight:
            stages.append(stage(COMPETITOR, COMPETITOR, cfg.seeds[0], "student", cfg.student.model, sources,
                                methods=method_label(cfg), keep=True))
            stages.append(stage("inversion-adaptive", ADAPTIVE, cfg.seeds[0], "teacher", cfg.teacher.model,
                                sources))
        for seed in cfg.seeds:
            if cfg.baseline:
                stages.append(stage(f"scratch-seed{seed}", "scratch", seed, "student", cfg.student.model))
            kinds = ["noise", "inverted"] if cfg.deep_inversion.noise_baseline else ["inverted"]
            for kind in kinds:
                stages.append(stage(f"{kind}-{method_label(cfg)}-seed{seed}", kind, seed, "student",
                                    cfg.student.model, sources, methods=method_label(cfg)))
        return stages

    def run_stage(self, cfg, stage, splits, ctx, job_state, resume_loop):
        if stage.kind in (SYNTHESIS, ADAPTIVE):
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
    """This worker's share of the inverted images (and of the noise set), one part file per worker and set; the
    adaptive round competes with the competitor student and adds its own parts."""
    spec = cfg.deep_inversion
    adaptive = stage.kind == ADAPTIVE
    per_class = spec.adaptive_images_per_class() if adaptive else spec.images_per_class - spec.adaptive_images_per_class()
    source = stage.teachers[0]
    teacher = build_teacher_model(cfg, source, splits.num_classes, job_state.weights, ctx.tracking_uri).to(ctx.device)
    order = teacher_class_order(cfg, source, splits.classes)
    labels = torch.arange(splits.num_classes).repeat(per_class)[ctx.rank::ctx.world_size]
    wanted = labels if order is None else torch.tensor(order)[labels]  # the teacher's own index of each class
    seed = 1_000_003 * stage.seed + ctx.rank + (7_919 if adaptive else 0)
    student = None
    settings = InversionSettings(spec.steps, spec.lr, spec.bn_weight, spec.tv_weight, spec.l2_weight)
    if adaptive:
        student = build_teacher_model(cfg, f"stage:{COMPETITOR}", splits.num_classes, job_state.weights,
                                      ctx.tracking_uri).to(ctx.device)
        settings = dataclasses.replace(settings, competition_weight=spec.competition_weight,
                                       competition_temperature=spec.competition_temperature)
    images = synthesize(teacher, wanted, tuple(splits.input_shape), settings, torch.Generator().manual_seed(seed),
                        student).cpu()
    with torch.no_grad():
        teacher.eval()
        hit = (teacher(images.to(ctx.device)).argmax(1).cpu() == wanted).float().mean().item()
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed + 1))
    part = f"part-{'adaptive-' if adaptive else ''}{ctx.rank:04d}.parquet"
    for name, x in (("inversion", images), ("noise", noise)):
        write_image_parquet(os.path.join(set_dir(cfg, name), part), x, labels, splits.classes)
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


@functools.lru_cache(maxsize=32)
def read_part_version(path: str, size: int, mtime_ns: int) -> tuple:
    """One part file's tensors, read once per process and version (the key holds its size and mtime)."""
    return read_image_parquet(path)


def read_part(path: str) -> tuple:
    info = os.stat(path)
    return read_part_version(path, info.st_size, info.st_mtime_ns)


def synthetic_splits(cfg, real: DatasetSplits, name: str) -> DatasetSplits:
    """The image set ``name`` (every worker's part) as the training split; val/test stay the real ones. The
    parts are read once per process (a job's student stages share them), keyed by path, size and mtime."""
    folder = set_dir(cfg, name)
    parts = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".parquet"))
    loaded = [read_part(p) for p in parts]
    images = torch.cat([x for x, _, _ in loaded])
    labels = torch.cat([y for _, y, _ in loaded])
    train = IndexedDataset(torch.utils.data.TensorDataset(images, labels))
    return DatasetSplits(train, real.val, real.test, real.num_classes, real.input_shape,
                         f"{real.fingerprint}:{name}:{len(images)}", real.classes)
