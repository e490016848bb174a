"""graph: a graph neural network teaches, on a graph dataset (``digits_graph``, ``graph_parquet``).

``graph.method: glnn`` (GLNN): a GNN teacher -> an MLP student (``node_mlp``) that needs no edges at inference;
``graph.method: lsp`` (LSP): a GNN teacher -> a smaller GNN matching each node's local structure. The mathematics
are :mod:`kdray.algorithms.schemes.graph`. Every stage (the teacher, the scratch student on labels alone, the
taught student) is full-graph training through :class:`~kdray.algorithms.schemes.graph.GraphLoop`, handed to the
common :func:`~kdray.orchestrator.job.complete_stage` (checkpoints, resume, MLflow). ``graph.setting:
inductive`` trains everything without the test nodes' edges (GLNN's inductive split); the test then uses the
whole graph, as a deployed GNN would. Each stage records ``inference_ms``: the median CPU time of one forward over
every node (the GNN with its edges, the MLP without), and its test top-1 by node in-degree and by hops to the
nearest labelled node (``test_top1_degree_*``, ``test_top1_hops_*``, with ``test_nodes_*`` counts); the job's
run plots them for the teacher and both students as ``accuracy_by_structure.png`` (GLNN's claim to check: does
an MLP that never sees edges hold up on nodes far from the labels?).
"""
from __future__ import annotations

import statistics
import time

import torch

from kdray.algorithms.engine import seed_everything
from kdray.algorithms.schemes.graph import GraphLoop
from kdray.data.graph import hops_from, in_degree
from kdray.models import create_model, list_models, model_family
from kdray.models.features import FeatureTap
from kdray.orchestrator.build import build_optimizer, build_teacher_model
from kdray.orchestrator.job import StageParts, complete_stage, stage_logging
from kdray.orchestrator.plan import (Scheme, TeacherSource, from_stage, model_spec, needs_teacher, register_scheme,
                                     stage)

KINDS = {"teacher": "graph_teacher", "scratch": "graph_scratch", "taught": "graph_distill"}


@torch.no_grad()
def inference_ms(model, x: torch.Tensor, edge_index: torch.Tensor | None, repeats: int = 7) -> float:
    """Median milliseconds of one eval forward over every node (``edge_index`` None: features only)."""
    was_training = model.training
    model.eval()
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        model(x) if edge_index is None else model(x, edge_index)
        times.append((time.perf_counter() - start) * 1e3)
    model.train(was_training)
    return statistics.median(times[1:])


DEGREE_BUCKETS = ((0, 0), (1, 1), (2, 3), (4, 7), (8, 15), (16, 31), (32, 63), (64, None))
HOP_BUCKETS = ((0, 0), (1, 1), (2, 2), (3, 3), (4, None))


def bucket_names(bounds) -> list[str]:
    """``(low, high)`` bounds as metric-key-safe names: ``8to15``, ``3``, ``64plus``."""
    return [f"{low}plus" if high is None else str(low) if low == high else f"{low}to{high}" for low, high in bounds]


def bucket_index(values: torch.Tensor, bounds) -> torch.Tensor:
    """Each value's bucket in ``bounds`` (-1 for a negative value: none applies)."""
    index = torch.full_like(values, -1)
    for k, (low, high) in enumerate(bounds):
        inside = values >= low if high is None else (values >= low) & (values <= high)
        index[inside] = k
    return index


def structure_groups(graph) -> dict[str, tuple[list[str], torch.Tensor]]:
    """The test report's node groupings on the graph the test sees: in-degree (powers of two) and hops to the
    nearest labelled training node (1, 2, 3, 4 or more; ``unreached``: no path from any)."""
    hops = hops_from(graph.edge_index, graph.num_nodes, graph.train)
    hop_index = bucket_index(hops, HOP_BUCKETS)
    hop_index[hops < 0] = len(HOP_BUCKETS)
    return {"degree": (bucket_names(DEGREE_BUCKETS), bucket_index(in_degree(graph.edge_index, graph.num_nodes),
                                                                  DEGREE_BUCKETS)),
            "hops": (bucket_names(HOP_BUCKETS) + ["unreached"], hop_index)}


def structure_figure(cfg, rows: list[dict]):
    """``accuracy_by_structure.png``: test top-1 by degree and by hops bucket of the teacher, the student on
    labels alone and the taught student (each the mean over its seeds), buckets labelled with their node count."""
    from kdray.orchestrator.plots import bucket_bars

    series_of = {KINDS["teacher"]: f"teacher ({cfg.teacher.model})", KINDS["scratch"]: f"{cfg.student.model} alone",
                 KINDS["taught"]: f"{cfg.graph.method} {cfg.student.model}"}
    panels = {}
    for name, title in (("degree", "by in-degree"), ("hops", "by hops to the nearest labelled node")):
        prefix = f"test_top1_{name}_"
        buckets = list(dict.fromkeys(k[len(prefix):] for row in rows for k in row if k.startswith(prefix)))
        if not buckets:
            continue
        counts = next(row for row in rows if f"{prefix}{buckets[0]}" in row)
        labels = [f"{b}\n(n={counts.get(f'test_nodes_{name}_{b}', 0)})" for b in buckets]
        series = {}
        for kind, label in series_of.items():
            kind_rows = [row for row in rows if row["kind"] == kind]
            if kind_rows:
                series[label] = [statistics.mean(row.get(f"{prefix}{b}", float("nan")) for row in kind_rows)
                                 for b in buckets]
        panels[title] = (labels, series)
    return bucket_bars(panels, "test top-1", f"{cfg.name}: test top-1 by node structure") if panels else None


@register_scheme
class GraphDistillation(Scheme):
    name = "graph"
    help = ("a GNN teacher on a graph dataset teaches an MLP that needs no edges (graph.method: glnn) or a smaller "
            "GNN matching local structure (lsp); full-graph training")
    sections = ("teacher", "graph")
    own_stage_kinds = tuple(KINDS.values())
    searched_kind = KINDS["taught"]

    def check(self, cfg):
        needs_teacher(cfg)
        if cfg.teacher.cache is not None:
            raise ValueError("scheme 'graph' runs the teacher on the whole graph; a teacher cache holds per-sample "
                             "outputs: give teacher.train, checkpoint or mlflow_uri")

    def plan(self, cfg):
        """[GNN teacher] -> per seed [the student on labels alone] + the taught student."""
        stages: list = []
        if cfg.teacher.train is not None:
            stages.append(stage("teacher", KINDS["teacher"], cfg.seeds[0], "teacher", cfg.teacher.model, keep=True))
            sources = [from_stage("teacher")]
        else:
            sources = [TeacherSource("spec", "teacher")]
        method = cfg.graph.method
        for seed in cfg.seeds:
            if cfg.baseline:
                stages.append(stage(f"scratch-seed{seed}", KINDS["scratch"], seed, "student", cfg.student.model))
            stages.append(stage(f"{method}-seed{seed}", KINDS["taught"], seed, "student", cfg.student.model,
                                sources, methods=method))
        return stages

    def check_data(self, cfg, splits):
        """A graph dataset, and node models by name (the registry's ``graph`` family), before any model is built.
        Their widths are checked against the node features where the generic preflight builds them
        (``check_input_width``), so no model is built only for this check."""
        if splits.graph is None:
            raise ValueError(f"scheme 'graph' needs a graph dataset (digits_graph, graph_parquet); "
                             f"{cfg.data.name!r} has no edges")
        node_models = [name for name in list_models() if model_family(name) == "graph"]
        for role in ("student", "teacher"):
            name = getattr(cfg, role).model
            if name not in node_models:
                raise ValueError(f"scheme 'graph' trains node models ({', '.join(node_models)}); the {role} "
                                 f"{name!r} is not one")

    def preflight(self, cfg, splits, example, student, teachers, orders):
        if not getattr(teachers[0], "uses_edges", False):
            raise ValueError(f"scheme 'graph' distils from a graph neural network; the teacher "
                             f"{cfg.teacher.model!r} reads no edges (use gcn or graphsage)")
        if cfg.graph.method == "lsp" and not getattr(student, "uses_edges", False):
            raise ValueError(f"graph.method: lsp matches each node's neighbourhood in the student too; "
                             f"{cfg.student.model!r} reads no edges (use gcn or graphsage, or method: glnn)")

    def job_figures(self, cfg, rows):
        figure = structure_figure(cfg, rows)
        return {} if figure is None else {"accuracy_by_structure.png": figure}

    def run_stage(self, cfg, stage, splits, ctx, job_state, resume_loop):
        spec_cfg, graph = cfg.graph, splits.graph
        spec = model_spec(cfg, stage.spec)
        optim = spec.train if stage.kind == KINDS["teacher"] else cfg.train
        seed_everything(stage.seed)
        model = create_model(spec.model, splits.num_classes, **spec.args).to(ctx.device)
        inductive = spec_cfg.setting == "inductive"
        train_graph = graph.without_nodes(graph.test) if inductive else graph
        seen = torch.ones(graph.num_nodes, dtype=torch.bool)
        if inductive:
            seen[graph.test] = False
        observed = seen.nonzero().flatten()
        method = spec_cfg.method if stage.kind == KINDS["taught"] else "none"
        teacher_logits = teacher_embedding = None
        if method != "none":
            teacher = build_teacher_model(cfg, stage.teachers[0], splits.num_classes, job_state.weights,
                                          ctx.tracking_uri).to(ctx.device).eval()
            tap = FeatureTap(teacher, [teacher.kd_embedding], "teacher")
            with torch.no_grad(), tap.capture() as feats:
                teacher_logits = teacher(train_graph.x.to(ctx.device), train_graph.edge_index.to(ctx.device))
            teacher_embedding = feats[teacher.kd_embedding]
            tap.remove()
        trainable = ctx.wrap(model)
        optimizer, scheduler = build_optimizer((p for p in trainable.parameters() if p.requires_grad), optim)
        logger, callbacks = stage_logging(cfg, stage, ctx, job_state, optim.epochs)
        loop = GraphLoop(method=method, x=graph.x, y=graph.y, train_edges=train_graph.edge_index,
                         eval_edges=graph.edge_index, labelled=graph.train[ctx.rank::ctx.world_size],
                         distilled=observed[ctx.rank::ctx.world_size], teacher_logits=teacher_logits,
                         teacher_embedding=teacher_embedding, lam=spec_cfg.lam, temperature=spec_cfg.temperature,
                         lsp_weight=spec_cfg.lsp_weight, lsp_kernel=spec_cfg.lsp_kernel, distiller=trainable,
                         optimizer=optimizer,
                         scheduler=scheduler, val_loader=graph.val, num_classes=splits.num_classes,
                         epochs=optim.epochs, device=ctx.device, callbacks=callbacks, eval_model=model,
                         test_groups=structure_groups(graph))
        parts = StageParts(spec, optim, model, model, trainable, None, None, graph.val, graph.test,
                           graph.x[:2], optimizer, scheduler, logger, callbacks)
        edges = graph.edge_index.to(ctx.device) if model.uses_edges else None
        extra = {"graph_method": method, "graph_setting": spec_cfg.setting,
                 "inference_ms": inference_ms(model, graph.x.to(ctx.device), edges)}
        return complete_stage(cfg, stage, splits, ctx, job_state, parts, loop, resume_loop, extra)
