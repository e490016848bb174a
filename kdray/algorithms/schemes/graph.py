"""Distillation on graphs: GLNN (GNN -> MLP) and LSP (GNN -> smaller GNN), trained full-graph.

* **GLNN** (Zhang, Liu, Sun & Shah, ICLR 2022, "Graph-less Neural Networks"): the student (an MLP over node
  features) minimises ``lam * CE(labelled nodes) + (1 - lam) * KL(teacher || student)`` over every node it may
  see (transductive: all nodes; inductive: all but the test nodes), the teacher's soft labels computed once. The
  paper searches ``lam`` in [0, 1] and uses T = 1; kdray's defaults are ``lam = 0.5``, ``T = 1``. At inference
  the student reads node features only: no edge, no neighbour fetch.
* **LSP** (Yang, Qiu, Song, Tao & Wang, CVPR 2020, "Distilling Knowledge from Graph Convolutional Networks"):
  each node's *local structure*, the distribution ``LS_i(j) = softmax_{j in N(i)} SIM(z_i, z_j)`` over its
  neighbours of a similarity of the node's embedding to theirs, is matched from teacher to student,
  ``sum_i KL(LS^T_i || LS^S_i)`` averaged over the nodes with a neighbour, beside the CE. SIM is the paper's
  RBF kernel (its best), ``exp(-||z_i - z_j||^2 / 2)``, here on l2-normalised embeddings (a departure: the paper
  sets the kernel width per task; normalising bounds the distances whatever the width and scale), or ``l2``,
  minus the squared distance of the raw embeddings (the paper's Euclidean variant; on digits_graph it made the
  students worse than scratch: 0.52 vs 0.79 at weight 1). The embeddings may differ in width: each model
  compares its own nodes only. Paper weight: chosen per task; kdray's default 10 (digits_graph, weights 1 / 10
  / 100 gave 0.81 / 0.89 / 0.72 against 0.79 for scratch, 3 seeds).

:class:`GraphLoop` trains a node model on the whole graph each epoch (one step: full-batch, the setting of
both papers). On several data-parallel workers each holds the whole graph and takes its own share of the
labelled (and of the distilled) nodes in the loss, so the averaged gradient is the full-graph gradient.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.algorithms.engine import NonFiniteLossError, TrainLoop
from kdray.algorithms.response.kd import kl_div_with_temperature
from kdray.models.features import FeatureTap

METHODS = ("none", "glnn", "lsp")


def segment_softmax(scores: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Softmax of ``scores`` within each group (edges grouped by their destination node)."""
    top = torch.full((num_groups,), float("-inf"), device=scores.device, dtype=scores.dtype)
    top = top.scatter_reduce(0, groups, scores, reduce="amax", include_self=True)
    weights = (scores - top[groups]).exp()
    total = torch.zeros(num_groups, device=scores.device, dtype=scores.dtype).index_add_(0, groups, weights)
    return weights / total[groups]


KERNELS = ("rbf", "l2")


def local_structure(embedding: torch.Tensor, edge_index: torch.Tensor, kernel: str = "rbf") -> torch.Tensor:
    """``LS_i(j)`` for every edge j -> i (neighbour j of node i): the softmax over i's neighbours of
    ``SIM(z_i, z_j)``, with ``rbf`` ``exp(-||z_i - z_j||^2 / 2)`` on l2-normalised embeddings (bounded, so
    embeddings of any scale give a smooth distribution) or ``l2`` ``-||z_i - z_j||^2`` on the raw ones. One value
    per edge, in ``edge_index``'s order."""
    src, dst = edge_index
    z = embedding.float()
    if kernel == "rbf":
        z = F.normalize(z, dim=1)
    distance = (z[dst] - z[src]).pow(2).sum(dim=1)
    similarity = (-distance / 2).exp() if kernel == "rbf" else -distance
    return segment_softmax(similarity, dst, embedding.shape[0])


def lsp_loss(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor, edge_index: torch.Tensor,
             nodes: torch.Tensor | None = None, kernel: str = "rbf") -> torch.Tensor:
    """LSP: the mean over nodes (``nodes``, default all) that have a neighbour of ``KL(LS^T_i || LS^S_i)``."""
    edge_index = edge_index[:, edge_index[0] != edge_index[1]]
    if nodes is not None:
        chosen = torch.zeros(student_embedding.shape[0], dtype=torch.bool, device=edge_index.device)
        chosen[nodes] = True
        edge_index = edge_index[:, chosen[edge_index[1]]]
    if edge_index.numel() == 0:
        return student_embedding.sum() * 0.0
    p_t = local_structure(teacher_embedding, edge_index, kernel)
    p_s = local_structure(student_embedding, edge_index, kernel)
    per_edge = p_t * (p_t.clamp_min(1e-12).log() - p_s.clamp_min(1e-12).log())
    dst = edge_index[1]
    per_node = torch.zeros(student_embedding.shape[0], device=per_edge.device).index_add_(0, dst, per_edge)
    has_neighbour = torch.zeros_like(per_node).index_add_(0, dst, torch.ones_like(per_edge)) > 0
    return per_node[has_neighbour].mean()


def glnn_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
              labelled: torch.Tensor, distilled: torch.Tensor, lam: float, temperature: float) -> dict:
    """GLNN's two terms (already weighted): ``lam`` x CE on the ``labelled`` nodes and ``(1 - lam)`` x the
    temperature-scaled KL on the ``distilled`` nodes."""
    return {"ce": lam * F.cross_entropy(student_logits[labelled].float(), targets[labelled]),
            "kd": (1.0 - lam) * kl_div_with_temperature(student_logits[distilled], teacher_logits[distilled],
                                                       temperature)}


def unwrap_module(module: nn.Module) -> nn.Module:
    while hasattr(module, "module"):
        module = module.module
    return module


class GraphLoop(TrainLoop):
    """Full-graph training of a node model (``distiller`` is the model, maybe DDP-wrapped).

    ``x`` / ``y`` / ``train_edges``: the graph the model is trained on (inductive: without the test nodes'
    edges); ``eval_edges``: the graph it is evaluated on. ``labelled`` / ``distilled``: this worker's share of
    the labelled nodes and of the nodes the teacher's knowledge is matched on. ``teacher_logits`` /
    ``teacher_embedding``: the frozen teacher's outputs on the training graph, computed once (``None``: no
    teacher). ``val_loader`` / the test split are node-id tensors (:meth:`evaluate_split`)."""

    def __init__(self, *, method: str, x: torch.Tensor, y: torch.Tensor, train_edges: torch.Tensor,
                 eval_edges: torch.Tensor, labelled: torch.Tensor, distilled: torch.Tensor,
                 teacher_logits: torch.Tensor | None = None, teacher_embedding: torch.Tensor | None = None,
                 lam: float = 0.5, temperature: float = 1.0, lsp_weight: float = 10.0, lsp_kernel: str = "rbf",
                 test_groups: dict[str, tuple[list[str], torch.Tensor]] | None = None, **loop_kwargs):
        if method not in METHODS:
            raise ValueError(f"graph method {method!r} is not one of {', '.join(METHODS)}")
        if method == "glnn" and teacher_logits is None or method == "lsp" and teacher_embedding is None:
            raise ValueError(f"graph method {method!r} needs the teacher's {'logits' if method == 'glnn' else 'embedding'}")
        super().__init__(teacher=None, train_loader=None, **loop_kwargs)
        self.method = method
        self.x, self.y = x.to(self.device), y.to(self.device)
        self.train_edges, self.eval_edges = train_edges.to(self.device), eval_edges.to(self.device)
        self.labelled, self.distilled = labelled.to(self.device), distilled.to(self.device)
        self.teacher_logits = None if teacher_logits is None else teacher_logits.to(self.device)
        self.teacher_embedding = None if teacher_embedding is None else teacher_embedding.to(self.device)
        if lsp_kernel not in KERNELS:
            raise ValueError(f"LSP kernel {lsp_kernel!r} is not one of {', '.join(KERNELS)}")
        self.lam, self.temperature, self.lsp_weight, self.lsp_kernel = lam, temperature, lsp_weight, lsp_kernel
        self.test_groups = test_groups or {}
        model = unwrap_module(self.distiller)
        self.tap = FeatureTap(model, [model.kd_embedding], "student") if method == "lsp" else None

    def losses(self) -> dict[str, torch.Tensor]:
        capture = self.tap.capture() if self.tap is not None else contextlib.nullcontext({})
        with capture as feats:
            logits = self.distiller(self.x, self.train_edges)
        if self.method == "glnn":
            return glnn_loss(logits, self.teacher_logits, self.y, self.labelled, self.distilled, self.lam,
                             self.temperature)
        losses = {"ce": F.cross_entropy(logits[self.labelled].float(), self.y[self.labelled])}
        if self.method == "lsp":
            embedding = feats[self.tap.points[0]]
            losses["lsp"] = self.lsp_weight * lsp_loss(embedding, self.teacher_embedding, self.train_edges,
                                                       self.distilled, self.lsp_kernel)
        return losses

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.distiller.train()
        losses = self.losses()
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            bad = [k for k, v in losses.items() if not torch.isfinite(v)]
            raise NonFiniteLossError(f"non-finite loss at epoch {epoch}: term(s) {bad}; lower train.lr")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"train_loss": float(loss.detach()), **{f"train_{k}": float(v.detach()) for k, v in losses.items()}}

    @torch.no_grad()
    def evaluate_test(self, nodes) -> dict[str, float]:
        """:meth:`evaluate_split`, plus for each grouping in ``test_groups`` (name -> bucket names and every
        node's bucket index, -1 for none) and each bucket holding test nodes ``top1_<name>_<bucket>`` and its
        node count ``nodes_<name>_<bucket>``: where in the graph a model is right (GLNN's question of whether
        an MLP holds up on nodes far from the labels)."""
        out = self.evaluate_split(nodes)
        if not self.test_groups or len(nodes) == 0:
            return out
        model = self.eval_model
        was_training = model.training
        model.eval()
        nodes = nodes.to(self.device)
        correct = (model(self.x, self.eval_edges)[nodes].argmax(1) == self.y[nodes]).cpu()
        model.train(was_training)
        for name, (buckets, index) in self.test_groups.items():
            of_test = index[nodes.cpu()]
            for k, bucket in enumerate(buckets):
                hit = correct[of_test == k]
                if hit.numel():
                    out[f"top1_{name}_{bucket}"] = float(hit.float().mean())
                    out[f"nodes_{name}_{bucket}"] = hit.numel()
        return out

    @torch.no_grad()
    def evaluate_split(self, nodes) -> dict[str, float]:
        """Top-1 (top-5 above 5 classes) and CE of the evaluated model on the node ids ``nodes``, the whole
        graph (``eval_edges``) given to it; every worker holds the graph, so nothing is reduced."""
        model = self.eval_model
        was_training = model.training
        model.eval()
        logits = model(self.x, self.eval_edges)[nodes.to(self.device)].float()
        model.train(was_training)
        targets = self.y[nodes.to(self.device)]
        if len(targets) == 0:
            return {"top1": float("nan"), "loss": float("nan")}
        out = {"top1": float((logits.argmax(1) == targets).float().mean()),
               "loss": float(F.cross_entropy(logits, targets))}
        if self.num_classes > 5:
            top5 = logits.topk(5, dim=1).indices
            out["top5"] = float((top5 == targets[:, None]).any(dim=1).float().mean())
        return out
