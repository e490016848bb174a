"""quantized: a full-precision (or quantised) teacher teaches a student trained with fake-quantised weights and
activations (Polino et al. 2018 quantized distillation, Mishra & Marr 2018 Apprentice, QKD's self-studying ->
tutoring phases; see :mod:`kdray.algorithms.quantize` for the quantisers and what of each paper is done).

Per seed the plan has [the fp32 student from scratch (``baseline``)], the quantised student trained alone
(CE only, same bits: the baseline that matters, kind ``quantized_scratch``) and the quantised student taught by
the ``methods:`` (kind ``distill``, as every taught student). Both quantised stages are the generic stage
(:func:`~kdray.orchestrator.job.prepare_stage` / ``complete_stage``) with the student's conv / linear layers
made fake-quantised in place after it is built (names, feature points, parameters, DDP and optimizer unchanged)
and a :class:`~kdray.algorithms.quantize.QuantizedLoop`. After training, rank 0 writes the low-bit export
``<stage>.pt`` into ``quantized.export_dir`` (default ``<run dir>/exports``): packed codes + per-channel or
per-tensor scales, ``weights_only`` loadable. It logs to the stage's MLflow run its size on disk (``export_bytes``), the fp32 student's (``fp32_bytes``),
and the CPU latency of a batch-of-64 forward (median of ``quantized.latency_runs``) of the dequantised export
(``latency_ms``: fp32 kernels on decoded weights, inputs fake-quantised; not integer execution) and of the fp32
student (``fp32_latency_ms``), and the tensors' bytes without torch.save's per-tensor overhead
(``export_payload_bytes``, ``fp32_payload_bytes``: on a tiny model that overhead is most of the file); the
file is the run's ``export/`` artifact. :func:`load_export` rebuilds it. The run's ``model/`` (and logged
model) is, as in every stage, the student's state dict: the latent fp32 weights, not the quantised ones.
"""
from __future__ import annotations

import os

import torch

from kdray.algorithms.engine import evaluate
from kdray.algorithms.quantize import (QuantizedLoop, export_quantized, latency_ms, load_quantized,
                                       payload_bytes, quantizable_layers, quantize_model_, saved_bytes)
from kdray.models import create_model
from kdray.orchestrator.build import check_distiller_builds
from kdray.orchestrator.job import complete_stage, prepare_stage
from kdray.orchestrator.plan import (SeedStage, Scheme, method_label, needs_methods, needs_teacher, register_scheme,
                                     scratch_baseline, taught_students, teacher_sources)

LATENCY_BATCH = 64


def quantize_student_(cfg, model) -> dict:
    """The student's layers quantised as ``quantized:`` says (in place); the quantised layers' settings."""
    spec = cfg.quantized
    return quantize_model_(model, spec.bits, spec.act_bits, spec.granularity == "per_channel",
                           spec.quantize_first_last)


def load_export(path: str) -> torch.nn.Module:
    """The dequantised model of an export file (``torch.load(weights_only=True)``), rebuilt on the CPU from
    the model name and args it records; it predicts what the fake-quantised student did."""
    export = torch.load(path, map_location="cpu", weights_only=True)
    meta = export["meta"]
    return load_quantized(create_model(meta["model"], meta["num_classes"], **meta["args"]), export).eval()


def latency_inputs(splits) -> torch.Tensor:
    """A batch of ``LATENCY_BATCH`` training inputs (cycled when the split is smaller)."""
    n = len(splits.train)
    return torch.stack([splits.train[i % n][0] for i in range(LATENCY_BATCH)])


def exporter(cfg, stage, splits, parts, extra: dict):
    """``on_trained`` of the loop, rank 0: write the export, measure it and the fp32 student, log both."""

    def on_trained(loop) -> None:
        spec = parts.spec
        meta = {"model": spec.model, "args": dict(spec.args), "num_classes": splits.num_classes}
        folder = cfg.quantized.export_dir
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{stage.name}.pt")
        export = export_quantized(parts.model, meta)
        torch.save(export, path + ".tmp")
        os.replace(path + ".tmp", path)
        fp32_state = {k: v.detach().cpu().contiguous() for k, v in parts.model.state_dict().items()}
        fp32 = create_model(spec.model, splits.num_classes, **spec.args)
        fp32.load_state_dict(fp32_state)
        inputs = latency_inputs(splits)
        runs = cfg.quantized.latency_runs
        figures = {"export_bytes": os.path.getsize(path), "fp32_bytes": saved_bytes(fp32_state),
                   "latency_ms": latency_ms(load_export(path), inputs, runs),
                   "fp32_latency_ms": latency_ms(fp32, inputs, runs)}
        figures["size_ratio"] = figures["fp32_bytes"] / figures["export_bytes"]
        figures["export_payload_bytes"] = payload_bytes({"q": export["quantized"], "t": export["tensors"]})
        figures["fp32_payload_bytes"] = payload_bytes(fp32_state)
        extra.update(figures, export_path=path)
        if parts.logger is not None:
            parts.logger.buffer(0, figures)  # written with the stage's final metrics
            parts.logger.client.log_artifact(parts.logger.run_id, path, "export")

    return on_trained


@register_scheme
class Quantized(Scheme):
    name = "quantized"
    help = ("quantised distillation: a student with fake-quantised weights and activations (quantized.bits) "
            "taught by the methods, beside the same quantised student without KD; exports packed low-bit codes")
    sections = ("teacher", "quantized")
    # The taught quantised student is of kind ``distill``, as the offline scheme's taught student: what a
    # sweep scores; trials skip the quantised-alone baseline.
    own_stage_kinds = ("quantized_scratch", "distill")
    searched_kind = "distill"
    search_settings = {"quantized": {"alone_baseline": False}}

    def check(self, cfg):
        needs_teacher(cfg)
        needs_methods(cfg)
        spec = cfg.quantized
        if spec.teacher_bits is not None and cfg.teacher.cache is not None:
            raise ValueError("quantized.teacher_bits quantises a live teacher; a teacher cache holds fp32 outputs: "
                             "remove teacher.cache or quantized.teacher_bits")
        folder = spec.export_dir or os.path.join(cfg.run_dir(), "exports")
        spec.__dict__["export_dir"] = os.path.abspath(os.path.expanduser(folder))  # the driver's, for every worker
        if spec.self_study_epochs >= cfg.train.epochs:
            raise ValueError(f"quantized.self_study_epochs ({spec.self_study_epochs}) leaves no tutoring epoch of "
                             f"train.epochs ({cfg.train.epochs}); make it smaller")

    def plan(self, cfg):
        """[teacher] -> per seed [fp32 scratch] + the quantised student alone + the quantised taught student."""
        stages: list = []
        bits = cfg.quantized.bits
        baselines = scratch_baseline(cfg)
        if cfg.quantized.alone_baseline:
            baselines.append(SeedStage(f"q{bits}-scratch", "quantized_scratch"))
        return taught_students(cfg, stages, teacher_sources(cfg, stages), name=f"q{bits}-{method_label(cfg)}",
                               baselines=baselines)

    def preflight(self, cfg, splits, example, student, teachers, orders):
        check_distiller_builds(cfg, example, student, teachers, orders, len(splits.train))
        layers = quantizable_layers(student)
        if not (layers if cfg.quantized.quantize_first_last else layers[1:-1]):
            raise ValueError(f"quantized: student {cfg.student.model!r} has {len(layers)} conv/linear layer(s), all "
                             f"kept fp32 as first/last; set quantized.quantize_first_last: true or use a deeper "
                             f"student")
        if cfg.quantized.teacher_bits is not None and teachers:
            teacher = teachers[0]
            n = len(quantizable_layers(teacher))
            if not (n if cfg.quantized.quantize_first_last else n - 2) > 0:
                raise ValueError("quantized.teacher_bits: the teacher has no conv/linear layer besides its first "
                                 "and last; set quantized.quantize_first_last: true")

    def run_stage(self, cfg, stage, splits, ctx, job_state, resume_loop):
        spec = cfg.quantized
        parts = prepare_stage(cfg, stage, splits, ctx, job_state)
        layers = quantize_student_(cfg, parts.model)
        extra: dict = {"quant_bits": spec.bits, "quant_layers": len(layers)}
        if spec.teacher_bits is not None and parts.teacher is not None:
            quantize_model_(parts.teacher.model, spec.teacher_bits, None, spec.granularity == "per_channel",
                            spec.quantize_first_last)
            extra["teacher_bits"] = spec.teacher_bits
            extra["teacher_test_top1"] = evaluate(parts.teacher.model, parts.test_loader, ctx.device,
                                                  splits.num_classes)["top1"]
        on_trained = exporter(cfg, stage, splits, parts, extra) if ctx.rank == 0 else None
        loop = QuantizedLoop(self_study_epochs=spec.self_study_epochs if parts.teacher is not None else 0,
                             on_trained=on_trained, **parts.loop_kwargs(splits, ctx))
        return complete_stage(cfg, stage, splits, ctx, job_state, parts, loop, resume_loop, extra)
