"""bench/glnn_inference.py at a tiny size: the L-hop gather by hand on a path graph, a GCN run on the gathered
ball reproducing its full-graph outputs at the query nodes, and the bench's table (6 cases, the GCN slower than
the MLP over the full graph, where it does strictly more work: the same linear layers plus propagation)."""
from __future__ import annotations

import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "bench"))
import glnn_inference  # noqa: E402

from kdray.models import create_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_k_hop_subgraph_of_a_path_by_hand():
    path = torch.tensor([[0, 1, 1, 2, 2, 3, 3, 4], [1, 0, 2, 1, 3, 2, 4, 3]])  # 0 - 1 - 2 - 3 - 4
    csr = glnn_inference.to_csr(path, 5)
    ball, edges, where = glnn_inference.k_hop_subgraph(csr, torch.tensor([3]), 1)
    assert ball.tolist() == [2, 3, 4] and where.tolist() == [1]
    assert sorted(map(tuple, ball[edges].t().tolist())) == [(2, 3), (3, 2), (3, 4), (4, 3)]
    ball, edges, _ = glnn_inference.k_hop_subgraph(csr, torch.tensor([0, 4]), 2)
    assert ball.tolist() == [0, 1, 2, 3, 4] and edges.shape[1] == 8


def test_a_gcn_on_the_gathered_ball_gives_its_full_graph_outputs():
    """With L layers the queries' outputs depend on the L-hop ball and on its rim's degrees: gathering L + 1
    hops makes them exact (the bench gathers L, as k_hop_subgraph-based serving does)."""
    x, _, edge_index = glnn_inference.stochastic_block_model(400, 4, 6.0, 1.0, 8)
    csr = glnn_inference.to_csr(edge_index, 400)
    gcn = create_model("gcn", 4, in_features=8, hidden=16, depth=1).eval()
    query = torch.tensor([5, 17, 300])
    with torch.no_grad():
        full = gcn(x, edge_index)[query]
        ball, edges, where = glnn_inference.k_hop_subgraph(csr, query, 3)
        torch.testing.assert_close(gcn(x[ball], edges)[where], full)
        assert len(ball) < 400


def test_the_bench_prints_six_cases_with_the_gcn_slower_on_the_full_graph(capsys):
    rows = glnn_inference.main(["--nodes", "1000", "--repeats", "3", "--features", "32", "--hidden", "32"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 6 and len(lines) == 2 + 2 + 6  # title, machine, table head, six rows
    assert [(r["case"], r["layers"]) for r in rows] == [(c, n) for n in (2, 3) for c in
                                                        ("full graph", "1 query node", "10 query nodes")]
    assert all(r["ratio"] > 1 for r in rows if r["case"] == "full graph"), rows
    assert all(0 < r["gathered"] <= 1000 for r in rows)
