"""GLNN's point, measured: an MLP student answers a node query from the node's features alone, a GNN teacher
must first gather the node's L-hop neighbourhood.

On a synthetic stochastic block model (``--nodes`` nodes in ``--classes`` equal blocks, a node's expected
degree ``--degree-in`` inside its block plus ``--degree-out`` across, features = the block's random mean plus
Gaussian noise) it times, CPU, one thread, the median of ``--repeats`` round-robin repeats (eval, no_grad):

(a) full-graph inference: kdray's ``gcn`` (index_add_ sparse propagation over every edge) vs ``node_mlp`` of the
    same width and layer count, for 2 and 3 layers;
(b) the serving case GLNN reports (Zhang et al., ICLR 2022, Table 5 / Fig. 1): predicting 1 and 10 query nodes.
    The GCN gathers the query nodes' L-hop ball from a CSR adjacency (breadth-first), the edges inside that
    ball, and the ball's feature rows, then runs on that subgraph (PyG's ``k_hop_subgraph`` recipe; the GCN's
    degree normalisation at the ball's rim uses the subgraph's degrees, a serving system storing full degrees
    pays the same gather). The MLP reads ``x[query]`` only. Each repeat takes the next of a fixed list of
    random query sets (seeded), the same list for both models.

Weights are random: timing does not depend on them. The table's ratio is teacher ms / student ms. Run:
``python bench/glnn_inference.py [--nodes 100000] [--repeats 20]``.
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import header, time_interleaved  # noqa: E402

from kdray.models import create_model  # noqa: E402


def stochastic_block_model(nodes: int, classes: int, degree_in: float, degree_out: float, features: int,
                           seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, y, edge_index)``: node ``i`` in block ``i % classes``; ``nodes * degree_in / 2`` random pairs
    inside a block and ``nodes * degree_out / 2`` across blocks, both directions, self pairs and repeats
    dropped (a sparse SBM: edge probabilities ``degree / block size``, sampled by pairs instead of per pair)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(nodes) % classes
    block = nodes // classes

    def pairs(count: int, same: bool) -> torch.Tensor:
        a = torch.randint(0, block * classes, (count,), generator=g)
        if same:  # another member of a's block: same residue mod classes
            b = torch.randint(0, block, (count,), generator=g) * classes + a % classes
        else:  # a member of another block
            shift = torch.randint(1, classes, (count,), generator=g)
            b = torch.randint(0, block, (count,), generator=g) * classes + (a % classes + shift) % classes
        return torch.stack([a, b])

    half = torch.cat([pairs(round(nodes * degree_in / 2), True), pairs(round(nodes * degree_out / 2), False)], 1)
    half = half[:, half[0] != half[1]]
    edge_index = torch.unique(torch.cat([half, half.flip(0)], dim=1), dim=1)
    means = torch.randn(classes, features, generator=g)
    x = means[y] + 2.0 * torch.randn(nodes, features, generator=g)
    return x, y, edge_index


def to_csr(edge_index: torch.Tensor, nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rowptr, src)``: node ``i``'s in-neighbours are ``src[rowptr[i]:rowptr[i + 1]]`` (edges src -> dst)."""
    order = torch.argsort(edge_index[1], stable=True)
    counts = torch.bincount(edge_index[1], minlength=nodes)
    rowptr = torch.zeros(nodes + 1, dtype=torch.long)
    rowptr[1:] = counts.cumsum(0)
    return rowptr, edge_index[0, order]


def neighbour_lists(csr, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(src, dst)`` of every edge into ``nodes``, read from the CSR without touching the rest of the graph."""
    rowptr, src = csr
    starts, counts = rowptr[nodes], rowptr[nodes + 1] - rowptr[nodes]
    total = int(counts.sum())
    first = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    positions = torch.repeat_interleave(starts, counts) + torch.arange(total) - first
    return src[positions], torch.repeat_interleave(nodes, counts)


def k_hop_subgraph(csr, query: torch.Tensor, hops: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ball, edge_index, where)``: the sorted node ids within ``hops`` of ``query``, the edges between them
    relabelled to positions in ``ball``, and the query nodes' positions in it."""
    ball = torch.unique(query)
    frontier = ball
    for _ in range(hops):
        reached, _ = neighbour_lists(csr, frontier)
        grown = torch.unique(torch.cat([ball, reached]))
        frontier = grown[~torch.isin(grown, ball)]
        ball = grown
    src, dst = neighbour_lists(csr, ball)
    inside = torch.isin(src, ball)
    edges = torch.stack([torch.searchsorted(ball, src[inside]), torch.searchsorted(ball, dst[inside])])
    return ball, edges, torch.searchsorted(ball, query)


def measure(nodes: int = 100_000, classes: int = 10, features: int = 128, hidden: int = 128,
            degree_in: float = 8.0, degree_out: float = 2.0, repeats: int = 20, queries=(1, 10), layers=(2, 3),
            seed: int = 0) -> list[dict]:
    """One row per case: ``case``, ``layers``, ``gathered`` (mean nodes the GCN reads), ``teacher_ms``,
    ``student_ms``, ``ratio`` (teacher / student)."""
    x, _, edge_index = stochastic_block_model(nodes, classes, degree_in, degree_out, features, seed)
    csr = to_csr(edge_index, nodes)
    g = torch.Generator().manual_seed(seed + 1)
    rows = []
    for depth in layers:
        torch.manual_seed(seed)
        gcn = create_model("gcn", classes, in_features=features, hidden=hidden, depth=depth - 1).eval()
        mlp = create_model("node_mlp", classes, in_features=features, hidden=hidden, depth=depth - 1).eval()
        with torch.no_grad():
            t = time_interleaved({"teacher": lambda: gcn(x, edge_index), "student": lambda: mlp(x)}, "cpu",
                                 warmup=1, repeats=repeats)
        rows.append({"case": "full graph", "layers": depth, "gathered": nodes, "teacher_ms": t["teacher"] * 1e3,
                     "student_ms": t["student"] * 1e3})
        for count in queries:
            sets = [torch.randint(0, nodes, (count,), generator=g) for _ in range(repeats + 1)]
            sizes = [len(k_hop_subgraph(csr, q, depth)[0]) for q in sets]
            teacher_sets, student_sets = itertools.cycle(sets), itertools.cycle(sets)

            def teacher():
                ball, edges, where = k_hop_subgraph(csr, next(teacher_sets), depth)
                return gcn(x[ball], edges)[where]

            def student():
                return mlp(x[next(student_sets)])

            with torch.no_grad():
                t = time_interleaved({"teacher": teacher, "student": student}, "cpu", warmup=1, repeats=repeats)
            rows.append({"case": f"{count} query node{'s' if count > 1 else ''}", "layers": depth,
                         "gathered": statistics.mean(sizes), "teacher_ms": t["teacher"] * 1e3,
                         "student_ms": t["student"] * 1e3})
    for row in rows:
        row["ratio"] = row["teacher_ms"] / row["student_ms"]
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| case | layers | nodes the GCN reads | GCN teacher ms | MLP student ms | teacher / student |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['layers']} | {r['gathered']:,.0f} | {r['teacher_ms']:.3f} | "
                     f"{r['student_ms']:.3f} | {r['ratio']:.1f}x |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--features", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--degree-in", type=float, default=8.0)
    parser.add_argument("--degree-out", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = measure(args.nodes, args.classes, args.features, args.hidden, args.degree_in, args.degree_out,
                   args.repeats, seed=args.seed)
    print(header(f"GLNN inference: GCN teacher vs MLP student on a {args.nodes:,}-node SBM "
                 f"(degree {args.degree_in:g} in + {args.degree_out:g} out, {args.features} features, "
                 f"hidden {args.hidden}), median of {args.repeats}, seed {args.seed}"))
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
