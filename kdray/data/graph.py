"""Graphs of nodes for graph-based distillation: node features, labels, edges and splits by node.

A :class:`Graph` holds the whole graph (``x`` node features, ``y`` labels, ``edge_index`` as a ``2 x E`` long
tensor of directed edges src -> dst, and the node ids of the ``train`` (labelled), ``val`` and ``test`` splits;
the other nodes are unlabelled but present, as in semi-supervised node classification). Datasets that return
one attach it to their :class:`~kdray.data.registry.DatasetSplits` (``splits.graph``); their per-sample splits
are the nodes' feature rows, so a plain offline job can still train an MLP on the labelled nodes.

Two datasets:

- ``digits_graph``: scikit-learn's digits as nodes (their 64 pixels as features) joined by a symmetric
  k-nearest-neighbour graph on those features (``k``, Euclidean), ``label_fraction`` of the nodes labelled;
- ``graph_parquet``: a graph stored on disk as ``nodes.parquet`` (``id``, ``label``, ``split`` in
  train | val | test | unlabelled, ``x`` a list of floats) and ``edges.parquet`` (``src``, ``dst`` node ids).
  A bad table is a one-line error naming the node: a repeated id, an edge to an id the node table lacks, a
  labelled node without a class index, ragged or non-finite features (a null label is allowed on unlabelled
  nodes, read as -1); :class:`Graph` itself refuses splits naming unknown nodes, a node in two splits, labels
  outside the classes and NaN features, however the graph was made.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import TensorDataset

from kdray.data.parquet_io import write_parquet_atomically
from kdray.data.registry import (DatasetFilesMissingError, DatasetSplits, IndexedDataset, register_dataset,
                                 split_indices)

SPLITS = ("train", "val", "test", "unlabelled")


@dataclass
class Graph:
    x: torch.Tensor  # (N, F) float node features
    y: torch.Tensor  # (N,) long labels (unlabelled nodes keep theirs, unread in training)
    edge_index: torch.Tensor  # (2, E) long, src -> dst
    train: torch.Tensor  # node ids of the labelled training nodes
    val: torch.Tensor
    test: torch.Tensor
    num_classes: int

    def __post_init__(self):
        """One-line errors for a graph that would train on garbage or fail deep inside a model: its shapes,
        non-finite features, edges or splits naming nodes it lacks, a node in two splits, labels that are not
        class indices. Unlabelled nodes' labels are never read (they may be -1)."""
        if self.x.dim() != 2:
            raise ValueError(f"node features must be N x F, got shape {tuple(self.x.shape)}")
        n = self.x.shape[0]
        if self.y.shape != (n,):
            raise ValueError(f"{self.y.numel()} labels for {n} nodes; give one label per node (-1 if unlabelled)")
        bad = (~torch.isfinite(self.x).all(dim=1)).nonzero().flatten()
        if bad.numel():
            raise ValueError(f"node {int(bad[0])}'s features hold NaN or inf ({bad.numel()} node(s) do); clean or "
                             f"impute them before building the graph")
        if self.edge_index.dim() != 2 or self.edge_index.shape[0] != 2:
            raise ValueError(f"edge_index must be 2 x E, got shape {tuple(self.edge_index.shape)}")
        if self.edge_index.numel():
            low, high = int(self.edge_index.min()), int(self.edge_index.max())
            if low < 0 or high >= n:
                raise ValueError(f"an edge names node {low if low < 0 else high}, but the graph has nodes 0..{n - 1}")
        for name in ("train", "val", "test"):
            ids = getattr(self, name)
            outside = ids[(ids < 0) | (ids >= n)]
            if outside.numel():
                raise ValueError(f"the {name} split names node {int(outside[0])}, but the graph has nodes "
                                 f"0..{n - 1}; list only this graph's node ids")
        labelled = torch.cat([self.train, self.val, self.test])
        times = torch.bincount(labelled, minlength=n)
        if labelled.numel() and int(times.max()) > 1:
            node = int(times.argmax())
            where = [name for name in ("train", "val", "test") if bool((getattr(self, name) == node).any())]
            raise ValueError(f"node {node} is listed {int(times.max())} times in the {' / '.join(where)} split(s); "
                             f"give each node at most one split")
        labels = self.y[labelled]
        wrong = ((labels < 0) | (labels >= self.num_classes)).nonzero().flatten()
        if wrong.numel():
            node = int(labelled[wrong[0]])
            split = next(name for name in ("train", "val", "test") if bool((getattr(self, name) == node).any()))
            raise ValueError(f"node {node} ({split} split) has label {int(self.y[node])}, outside the "
                             f"{self.num_classes} classes 0..{self.num_classes - 1}; a labelled node needs a class index")

    @property
    def num_nodes(self) -> int:
        return self.x.shape[0]

    @property
    def num_features(self) -> int:
        return self.x.shape[1]

    def without_nodes(self, nodes: torch.Tensor) -> "Graph":
        """The same graph with every edge touching ``nodes`` removed (the inductive setting: test nodes
        unseen while training; their features stay, isolated)."""
        hidden = torch.zeros(self.num_nodes, dtype=torch.bool)
        hidden[nodes] = True
        keep = ~(hidden[self.edge_index[0]] | hidden[self.edge_index[1]])
        return Graph(self.x, self.y, self.edge_index[:, keep], self.train, self.val, self.test, self.num_classes)

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for t in (self.x, self.y, self.edge_index, self.train, self.val, self.test):
            digest.update(t.contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def in_degree(edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Each node's number of in-neighbours (self loops not counted; a symmetric graph: its degree)."""
    dst = edge_index[1][edge_index[0] != edge_index[1]]
    return torch.bincount(dst, minlength=num_nodes)


def hops_from(edge_index: torch.Tensor, num_nodes: int, sources: torch.Tensor) -> torch.Tensor:
    """Each node's number of hops (edges src -> dst followed) from the nearest of ``sources`` (0 for a
    source, -1 for a node none reaches): a breadth-first search from every source at once."""
    hops = torch.full((num_nodes,), -1, dtype=torch.long)
    frontier = torch.unique(sources)
    hops[frontier] = 0
    reached = torch.zeros(num_nodes, dtype=torch.bool)
    reached[frontier] = True
    src, dst = edge_index
    distance = 0
    while frontier.numel():
        distance += 1
        on_frontier = torch.zeros(num_nodes, dtype=torch.bool)
        on_frontier[frontier] = True
        step = torch.unique(dst[on_frontier[src]])
        frontier = step[~reached[step]]
        reached[frontier] = True
        hops[frontier] = distance
    return hops


def knn_graph(features: torch.Tensor, k: int) -> torch.Tensor:
    """Symmetric k-nearest-neighbour edges (Euclidean, no self loops) as a ``2 x E`` edge index: i -> j and
    j -> i for every j among i's k nearest, each pair once per direction."""
    if not 0 < k < features.shape[0]:
        raise ValueError(f"k must be in 1..{features.shape[0] - 1} for {features.shape[0]} nodes, got {k}")
    dist = torch.cdist(features.float(), features.float())
    dist.fill_diagonal_(float("inf"))
    nearest = dist.topk(k, dim=1, largest=False).indices  # (N, k)
    src = torch.arange(features.shape[0]).repeat_interleave(k)
    dst = nearest.flatten()
    both = torch.cat([torch.stack([src, dst]), torch.stack([dst, src])], dim=1)
    return torch.unique(both, dim=1)


def node_splits(graph: Graph, name: str) -> DatasetSplits:
    """Per-node splits (feature row, label) of ``graph``, with the graph attached."""
    def part(ids):
        return IndexedDataset(TensorDataset(graph.x[ids], graph.y[ids]))

    return DatasetSplits(part(graph.train), part(graph.val), part(graph.test), graph.num_classes,
                         (graph.num_features,), f"{name}:{graph.fingerprint()}", graph=graph)


@register_dataset("digits_graph", "scikit-learn's digits as a k-nearest-neighbour graph of 1797 nodes (64 pixel "
                                  "features); label_fraction of them labelled; no download")
def digits_graph(root=None, seed: int = 0, k: int = 10, label_fraction: float = 0.05, val_fraction: float = 0.1,
                 test_fraction: float = 0.2) -> DatasetSplits:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    rest, val, test = split_indices(len(x), (val_fraction, test_fraction), seed)
    labelled = max(1, round(len(x) * label_fraction))
    graph = Graph(x, y, knn_graph(x, k), torch.tensor(sorted(rest[:labelled])), torch.tensor(sorted(val)),
                  torch.tensor(sorted(test)), 10)
    return node_splits(graph, "digits_graph")


def write_graph_parquet(folder: str, graph: Graph, ids: list[int] | None = None) -> str:
    """``graph`` as ``folder/nodes.parquet`` + ``folder/edges.parquet`` (node ``ids`` default 0..N-1)."""
    import pyarrow as pa

    os.makedirs(folder, exist_ok=True)
    ids = list(range(graph.num_nodes)) if ids is None else list(ids)
    split = ["unlabelled"] * graph.num_nodes
    for name in ("train", "val", "test"):
        for node in getattr(graph, name).tolist():
            split[node] = name
    nodes = pa.table({"id": ids, "label": graph.y.tolist(), "split": split, "x": graph.x.tolist()})
    edges = pa.table({"src": [ids[i] for i in graph.edge_index[0].tolist()],
                      "dst": [ids[i] for i in graph.edge_index[1].tolist()]})
    for table, name in ((nodes, "nodes"), (edges, "edges")):
        write_parquet_atomically(table, os.path.join(folder, f"{name}.parquet"))
    return folder


def read_graph_parquet(folder: str) -> Graph:
    """The graph in ``folder`` (see the module docstring); one-line errors for missing files or columns, an
    unknown split name, and edges naming nodes the node table lacks."""
    import pyarrow.parquet as pq

    paths = {name: os.path.join(folder, f"{name}.parquet") for name in ("nodes", "edges")}
    for name, path in paths.items():
        if not os.path.isfile(path):
            raise DatasetFilesMissingError(f"graph_parquet: {path} does not exist (a graph folder holds "
                                           f"nodes.parquet and edges.parquet)")
    nodes, edges = pq.read_table(paths["nodes"]), pq.read_table(paths["edges"])
    for table, name, columns in ((nodes, "nodes", ("id", "label", "split", "x")), (edges, "edges", ("src", "dst"))):
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise ValueError(f"graph_parquet: {paths[name]} lacks column(s) {missing} (has {table.column_names})")
    ids = nodes.column("id").to_pylist()
    position: dict = {}
    for row, node in enumerate(ids):
        if node in position:
            raise ValueError(f"graph_parquet: {paths['nodes']} lists node id {node} twice (rows {position[node]} and "
                             f"{row}); node ids must be unique")
        position[node] = row
    src, dst = edges.column("src").to_pylist(), edges.column("dst").to_pylist()
    for row, (a, b) in enumerate(zip(src, dst)):
        if a not in position or b not in position:
            raise ValueError(f"graph_parquet: edges.parquet row {row} names node {a if a not in position else b}, "
                             f"which nodes.parquet does not have; every src / dst must be a node id")
    split = nodes.column("split").to_pylist()
    unknown = sorted(set(split) - set(SPLITS))
    if unknown:
        raise ValueError(f"graph_parquet: split value(s) {unknown} in nodes.parquet; allowed: {', '.join(SPLITS)}")
    raw_labels = nodes.column("label").to_pylist()
    for row, (label, part) in enumerate(zip(raw_labels, split)):
        if part != "unlabelled" and (label is None or label < 0):
            raise ValueError(f"graph_parquet: nodes.parquet node {ids[row]} ({part} split) has label {label}; "
                             f"a {part} node needs a class index 0, 1, ... (unknown labels: split unlabelled)")
    features = nodes.column("x").to_pylist()
    width = len(features[0] or []) if features else 0
    for row, vector in enumerate(features):
        if vector is None or len(vector) != width:
            raise ValueError(f"graph_parquet: nodes.parquet node {ids[row]} has {len(vector or [])} features, node "
                             f"{ids[0]} has {width}; every x must be a list of the same length")
    x = torch.from_numpy(np.array(features, dtype=np.float32).reshape(len(ids), width))  # a null: NaN
    bad = (~torch.isfinite(x).all(dim=1)).nonzero().flatten()
    if bad.numel():
        raise ValueError(f"graph_parquet: nodes.parquet node {ids[int(bad[0])]}'s x holds a NaN, inf or null "
                         f"({bad.numel()} node(s) do); clean or impute the features before training")
    labels = torch.tensor([-1 if label is None else label for label in raw_labels], dtype=torch.long)
    by_split = {name: torch.tensor([i for i, s in enumerate(split) if s == name], dtype=torch.long)
                for name in ("train", "val", "test")}
    edge_index = torch.tensor([[position[a] for a in src], [position[b] for b in dst]], dtype=torch.long)
    return Graph(x, labels,
                 edge_index.reshape(2, -1), by_split["train"], by_split["val"], by_split["test"],
                 int(labels.max()) + 1 if len(labels) else 0)


@register_dataset("graph_parquet", "a graph on disk: data.root/nodes.parquet (id, label, split, x) and "
                                   "data.root/edges.parquet (src, dst)")
def graph_parquet(root=None, seed: int = 0) -> DatasetSplits:
    if root is None:
        raise DatasetFilesMissingError("dataset 'graph_parquet' needs data.root (the folder of nodes.parquet and "
                                       "edges.parquet)")
    return node_splits(read_graph_parquet(root), f"graph_parquet:{root}")
