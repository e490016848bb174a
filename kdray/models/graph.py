"""Graph neural networks by name, on plain torch (``index_add_`` message passing, no compiled extension):
``gcn`` (Kipf & Welling 2017), ``graphsage`` (Hamilton et al. 2017, mean aggregator) and ``node_mlp``, an MLP
over node features alone (GLNN's student: no edges at inference).

Every one is called ``model(x, edge_index=None)`` with the ``(N, F)`` node features and the ``2 x E`` directed
edges (src -> dst); ``node_mlp`` ignores the edges, and a GNN given none sees each node alone. ``in_features``
is the node-feature width (64 for ``digits_graph``). The last hidden representation passes through the
``embedding`` module (an identity), the feature point graph terms such as LSP read (``kd_embedding``).
PyTorch Geometric was not used: the models need a scatter-add and a degree count, which torch has, and PyG's
optional compiled extensions would not install here.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from kdray.models.registry import register_model


def with_self_loops(edge_index: torch.Tensor | None, num_nodes: int, device) -> torch.Tensor:
    loops = torch.arange(num_nodes, device=device).repeat(2, 1)
    if edge_index is None or edge_index.numel() == 0:
        return loops
    edge_index = edge_index.to(device)
    return torch.cat([edge_index[:, edge_index[0] != edge_index[1]], loops], dim=1)


def gcn_propagate(h: torch.Tensor, edge_index: torch.Tensor | None) -> torch.Tensor:
    """``D^-1/2 (A + I) D^-1/2 h``: each node the degree-normalised sum of itself and its in-neighbours."""
    n = h.shape[0]
    src, dst = with_self_loops(edge_index, n, h.device)
    degree = torch.zeros(n, device=h.device).index_add_(0, dst, torch.ones_like(dst, dtype=h.dtype))
    norm = degree.rsqrt()
    weight = (norm[src] * norm[dst]).unsqueeze(1)
    return torch.zeros_like(h).index_add_(0, dst, h[src] * weight)


def mean_neighbours(h: torch.Tensor, edge_index: torch.Tensor | None) -> torch.Tensor:
    """The mean of each node's in-neighbours' rows (zero for a node without any)."""
    n = h.shape[0]
    if edge_index is None or edge_index.numel() == 0:
        return torch.zeros_like(h)
    src, dst = edge_index.to(h.device)
    total = torch.zeros_like(h).index_add_(0, dst, h[src])
    count = torch.zeros(n, device=h.device).index_add_(0, dst, torch.ones_like(dst, dtype=h.dtype))
    return total / count.clamp_min(1).unsqueeze(1)


class GCNLayer(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.linear = nn.Linear(cin, cout)

    def forward(self, h, edge_index):
        return gcn_propagate(self.linear(h), edge_index)


class SAGELayer(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.self_linear = nn.Linear(cin, cout)
        self.neighbour_linear = nn.Linear(cin, cout, bias=False)

    def forward(self, h, edge_index):
        return self.self_linear(h) + self.neighbour_linear(mean_neighbours(h, edge_index))


class NodeModel(nn.Module):
    """``depth`` message-passing (or, for the MLP, linear) layers of width ``hidden`` with ReLU and dropout,
    then the ``embedding`` point and a classifier layer of the same kind (``depth = 1``: Kipf & Welling's
    two-layer GCN)."""

    def __init__(self, layer, num_classes: int, in_features: int, hidden: int, depth: int, dropout: float):
        super().__init__()
        widths = [in_features] + [hidden] * depth
        self.layers = nn.ModuleList(layer(a, b) for a, b in zip(widths, widths[1:]))
        self.dropout = nn.Dropout(dropout)
        self.embedding = nn.Identity()
        self.head = layer(widths[-1], num_classes)
        self.in_features = in_features
        self.uses_edges = layer is not nn.Linear
        self.kd_embedding = "embedding"
        self.kd_stages = [f"layers.{i}" for i in range(depth)]

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor | None = None) -> torch.Tensor:
        h = x
        for layer in self.layers:
            h = self.dropout(torch.relu(layer(h, edge_index) if self.uses_edges else layer(h)))
        h = self.embedding(h)
        return self.head(h, edge_index) if self.uses_edges else self.head(h)


@register_model("gcn", family="graph")
def gcn(num_classes: int = 10, in_features: int = 64, hidden: int = 64, depth: int = 1, dropout: float = 0.5):
    return NodeModel(GCNLayer, num_classes, in_features, hidden, depth, dropout)


@register_model("graphsage", family="graph")
def graphsage(num_classes: int = 10, in_features: int = 64, hidden: int = 64, depth: int = 1, dropout: float = 0.5):
    return NodeModel(SAGELayer, num_classes, in_features, hidden, depth, dropout)


@register_model("node_mlp", family="graph")
def node_mlp(num_classes: int = 10, in_features: int = 64, hidden: int = 64, depth: int = 1, dropout: float = 0.5):
    return NodeModel(nn.Linear, num_classes, in_features, hidden, depth, dropout)
