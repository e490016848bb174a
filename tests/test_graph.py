"""Scheme ``graph`` (kdray/orchestrator/schemes/graph.py, kdray/algorithms/schemes/graph.py) on graph data
(kdray/data/graph.py) and node models (kdray/models/graph.py): the kNN graph, GCN propagation, LSP and GLNN
losses by hand; GLNN's MLP student against the same MLP on labels alone and the GCN teacher on the digits kNN
graph with 5 % labelled nodes (and its predictions without edges); LSP's smaller GCN against the same GCN alone;
the Parquet graph loader; 2 Ray Train workers; exact resume; one-line errors before training."""
from __future__ import annotations

import copy
import math
import statistics

import pytest
import torch

import kdray
from kdray.algorithms.schemes.graph import glnn_loss, local_structure, lsp_loss, segment_softmax
from kdray.config import ConfigError
from kdray.data import build_datasets
from kdray.data.graph import Graph, knn_graph, read_graph_parquet, write_graph_parquet
from kdray.models import create_model
from kdray.models.graph import gcn_propagate

pytestmark = pytest.mark.usefixtures("one_thread")

ADAM = {"optimizer": "adamw", "lr": 0.01, "weight_decay": 5e-4, "batch_size": 32}


def graph_job(tmp_path, method="glnn", student=None, epochs=200, **over):
    cfg = {"name": method, "output_dir": str(tmp_path / "runs"), "scheme": "graph",
           "data": {"name": "digits_graph", "options": {"label_fraction": 0.05}},
           "teacher": {"model": "gcn", "args": {"hidden": 64}, "train": {"epochs": epochs, **ADAM}},
           "student": student or {"model": "node_mlp", "args": {"hidden": 64}},
           "train": {"epochs": epochs, **ADAM}, "graph": {"method": method}, "seeds": [0], "baseline": True,
           "ray": {"num_workers": 0}, "mlflow": {"enabled": False}}
    cfg.update(over)
    return cfg


# --- data, models and losses by hand ---------------------------------------------------------------------
def test_knn_graph_is_symmetric_without_self_loops():
    points = torch.tensor([[0.0], [1.0], [3.0], [7.0]])  # nearest: 0->1, 1->0, 2->1, 3->2
    edges = knn_graph(points, 1)
    assert sorted(map(tuple, edges.t().tolist())) == [(0, 1), (1, 0), (1, 2), (2, 1), (2, 3), (3, 2)]
    digits = build_datasets("digits_graph").graph
    pairs = set(map(tuple, digits.edge_index.t().tolist()))
    assert all((b, a) in pairs for a, b in pairs) and not any(a == b for a, b in pairs)
    assert torch.bincount(digits.edge_index[1], minlength=digits.num_nodes).min() >= 10


def test_gcn_propagation_is_the_symmetrically_normalised_sum_with_self_loops():
    h = torch.tensor([[1.0], [2.0], [4.0]])
    edges = torch.tensor([[0, 1], [1, 0]])  # 0 <-> 1, node 2 alone; degrees with self loops 2, 2, 1
    out = gcn_propagate(h, edges)
    assert out.flatten().tolist() == pytest.approx([(1 + 2) / 2, (2 + 1) / 2, 4.0])
    assert gcn_propagate(h, None).flatten().tolist() == pytest.approx([1.0, 2.0, 4.0])


def test_local_structure_and_lsp_loss_by_hand():
    scores, groups = torch.tensor([0.0, math.log(3.0), 5.0]), torch.tensor([0, 0, 1])
    assert segment_softmax(scores, groups, 2).tolist() == pytest.approx([0.25, 0.75, 1.0])
    # node 0's neighbours 1 and 2; l2 kernel: similarities -1 and -4
    z = torch.tensor([[0.0], [1.0], [2.0]])
    edges = torch.tensor([[1, 2], [0, 0]])
    e = math.exp(-1) + math.exp(-4)
    assert local_structure(z, edges, "l2").tolist() == pytest.approx([math.exp(-1) / e, math.exp(-4) / e])
    teacher = torch.tensor([[0.0], [1.0], [1.0]])  # equidistant neighbours: LS (1/2, 1/2)
    p = [math.exp(-1) / e, math.exp(-4) / e]
    want = 0.5 * math.log(0.5 / p[0]) + 0.5 * math.log(0.5 / p[1])
    assert lsp_loss(z, teacher, edges, kernel="l2").item() == pytest.approx(want, rel=1e-5)
    assert lsp_loss(z, z * 3.0, edges, kernel="l2").item() > 0  # l2 sees the scale
    assert lsp_loss(z + 1.0, z * 3.0 + 1.0, edges, kernel="rbf").item() == pytest.approx(0.0, abs=1e-6)  # not rbf


def test_glnn_loss_weights_ce_on_labelled_and_kl_on_distilled_nodes():
    student = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])  # (3/4, 1/4) and (1/2, 1/2)
    parts = glnn_loss(student, teacher, torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([0, 1]), 0.25, 1.0)
    assert parts["ce"].item() == pytest.approx(0.25 * math.log(2.0))
    kl_first = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert parts["kd"].item() == pytest.approx(0.75 * kl_first / 2, rel=1e-5)


def test_graph_parquet_round_trip_and_an_edge_to_an_unknown_node(tmp_path):
    graph = Graph(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), torch.tensor([[0, 1, 2], [1, 2, 3]]),
                  torch.tensor([0]), torch.tensor([1]), torch.tensor([2, 3]), 2)
    folder = write_graph_parquet(str(tmp_path / "g"), graph, ids=[10, 11, 12, 13])
    back = read_graph_parquet(folder)
    assert torch.equal(back.x, graph.x) and torch.equal(back.edge_index, graph.edge_index)
    assert back.train.tolist() == [0] and back.test.tolist() == [2, 3] and back.num_classes == 2
    splits = build_datasets("graph_parquet", root=folder)
    assert len(splits.train) == 1 and splits.graph.num_nodes == 4
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"src": [10, 999], "dst": [11, 10]}), f"{folder}/edges.parquet")
    job = graph_job(tmp_path, data={"name": "graph_parquet", "root": folder},
                    teacher={"model": "gcn", "args": {"in_features": 3}, "train": {"epochs": 1, **ADAM}},
                    student={"model": "node_mlp", "args": {"in_features": 3}})
    with pytest.raises(ConfigError, match=r"^data: graph_parquet: edges.parquet row 1 names node 999, which "
                                          r"nodes.parquet does not have; every src / dst must be a node id$"):
        kdray.distill(job, quiet=True)
    assert not (tmp_path / "runs").exists()


def edit_nodes(folder, column, edit):
    """Rewrite one column of ``folder/nodes.parquet`` through ``edit(values) -> values``."""
    import pyarrow.parquet as pq

    table = pq.read_table(f"{folder}/nodes.parquet")
    values = edit(table.column(column).to_pylist())
    table = table.set_column(table.column_names.index(column), column, [values])
    pq.write_table(table, f"{folder}/nodes.parquet")


def set_at(values, row, value):
    return values[:row] + [value] + values[row + 1:]


@pytest.mark.parametrize("column, edit, pattern", [
    ("id", lambda v: set_at(v, 2, 11), r"lists node id 11 twice \(rows 1 and 2\); node ids must be unique$"),
    ("x", lambda v: set_at(v, 3, [0.5, float("nan"), 1.0]),
     r"node 13's x holds a NaN, inf or null \(1 node\(s\) do\); clean or impute the features before training$"),
    ("x", lambda v: set_at(v, 1, [0.5, None, 1.0]), r"node 11's x holds a NaN, inf or null"),
    ("x", lambda v: set_at(v, 2, [0.5]), r"node 12 has 1 features, node 10 has 3; every x must be a list of the "
                                         r"same length$"),
    ("label", lambda v: set_at(v, 0, -1), r"node 10 \(train split\) has label -1; a train node needs a class "
                                          r"index 0, 1, ... \(unknown labels: split unlabelled\)$"),
    ("label", lambda v: set_at(v, 2, None), r"node 12 \(test split\) has label None"),
])
def test_bad_graph_tables_fail_in_one_line_naming_the_node(tmp_path, column, edit, pattern):
    graph = Graph(torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 0]), torch.tensor([[0, 1, 2], [1, 2, 3]]),
                  torch.tensor([0]), torch.tensor([1]), torch.tensor([2, 3]), 2)
    folder = write_graph_parquet(str(tmp_path / "g"), graph, ids=[10, 11, 12, 13, 14])
    edit_nodes(folder, column, edit)
    job = graph_job(tmp_path, data={"name": "graph_parquet", "root": folder},
                    teacher={"model": "gcn", "args": {"in_features": 3}, "train": {"epochs": 1, **ADAM}},
                    student={"model": "node_mlp", "args": {"in_features": 3}})
    with pytest.raises(ConfigError, match=r"^data: graph_parquet: \S*nodes.parquet .*" + pattern.lstrip("^")) as err:
        kdray.distill(job, quiet=True)
    assert "\n" not in str(err.value) and not (tmp_path / "runs").exists()


def test_an_unlabelled_node_may_have_no_label(tmp_path):
    graph = Graph(torch.randn(3, 2), torch.tensor([0, 1, 0]), torch.tensor([[0, 1], [1, 2]]), torch.tensor([0]),
                  torch.tensor([1]), torch.tensor([], dtype=torch.long), 2)
    folder = write_graph_parquet(str(tmp_path / "g"), graph)
    edit_nodes(folder, "label", lambda v: set_at(v, 2, None))
    back = read_graph_parquet(folder)
    assert back.y.tolist() == [0, 1, -1] and back.num_classes == 2


@pytest.mark.parametrize("change, pattern", [
    ({"train": torch.tensor([9])}, r"^the train split names node 9, but the graph has nodes 0..3; list only this "
                                   r"graph's node ids$"),
    ({"test": torch.tensor([0, 3])}, r"^node 0 is listed 2 times in the train / test split\(s\); give each node at "
                                     r"most one split$"),
    ({"y": torch.tensor([0, 5, 0, 1])}, r"^node 1 \(val split\) has label 5, outside the 2 classes 0..1; a labelled "
                                        r"node needs a class index$"),
    ({"y": torch.tensor([0, 1, 0])}, r"^3 labels for 4 nodes; give one label per node \(-1 if unlabelled\)$"),
    ({"x": torch.tensor([[0.0, 1.0], [1.0, 1.0], [float("inf"), 0.0], [0.0, 0.0]])},
     r"^node 2's features hold NaN or inf \(1 node\(s\) do\); clean or impute them before building the graph$"),
])
def test_bad_graphs_are_refused_in_one_line(change, pattern):
    parts = {"x": torch.randn(4, 2), "y": torch.tensor([0, 1, -1, 1]), "edge_index": torch.tensor([[0, 1], [1, 2]]),
             "train": torch.tensor([0]), "val": torch.tensor([1]), "test": torch.tensor([3]), "num_classes": 2}
    Graph(**parts)  # the unchanged graph is fine (node 2 unlabelled, label -1)
    with pytest.raises(ValueError, match=pattern):
        Graph(**{**parts, **change})


@pytest.mark.parametrize("over, pattern", [
    ({"data": {"name": "digits"}}, r"scheme 'graph' needs a graph dataset \(digits_graph, graph_parquet\); "
                                   r"'digits' has no edges"),
    ({"student": {"model": "node_mlp", "args": {"in_features": 32}}},
     r"student.args.in_features is 32 but the graph's nodes have 64 features; set student.args.in_features: 64"),
    ({"teacher": {"model": "gcn", "args": {"in_features": 16}, "train": {"epochs": 1}}},
     r"teacher.args.in_features is 16 but the graph's nodes have 64 features; set teacher.args.in_features: 64"),
    ({"teacher": {"model": "node_mlp", "train": {"epochs": 1}}}, r"the teacher 'node_mlp' reads no edges"),
    ({"graph": {"method": "lsp"}}, r"graph.method: lsp matches each node's neighbourhood in the student too"),
    ({"graph": {"method": "gat"}}, r"graph.method: Input should be 'glnn' or 'lsp'"),
    ({"teacher": {"model": "digits_cnn", "train": {"epochs": 1}}}, r"node models \(gcn, graphsage, node_mlp\)"),
])
def test_bad_graph_configs_fail_in_one_line_before_training(tmp_path, over, pattern):
    with pytest.raises(ConfigError, match=pattern) as err:
        kdray.distill(graph_job(tmp_path, **over), quiet=True)
    assert "\n" not in str(err.value) and not (tmp_path / "runs" / "glnn").exists()


def test_degree_and_hops_to_the_labelled_nodes_by_hand():
    from kdray.data.graph import hops_from, in_degree
    from kdray.orchestrator.schemes.graph import HOP_BUCKETS, bucket_index, bucket_names, structure_groups

    # path 0 - 1 - 2 - 3 - 4 - 5, a self loop on 2 (not a neighbour), node 6 alone; 0 labelled
    edges = torch.tensor([[0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 2], [1, 0, 2, 1, 3, 2, 4, 3, 5, 4, 2]])
    assert in_degree(edges, 7).tolist() == [1, 2, 2, 2, 2, 1, 0]
    assert hops_from(edges, 7, torch.tensor([0])).tolist() == [0, 1, 2, 3, 4, 5, -1]
    assert bucket_names(HOP_BUCKETS) == ["0", "1", "2", "3", "4plus"]
    assert bucket_index(torch.tensor([0, 3, 4, 9, -1]), HOP_BUCKETS).tolist() == [0, 3, 4, 4, -1]
    graph = Graph(torch.randn(7, 2), torch.zeros(7, dtype=torch.long), edges, torch.tensor([0]),
                  torch.tensor([1]), torch.tensor([5, 6]), 2)
    groups = structure_groups(graph)
    names, index = groups["hops"]
    assert [names[i] for i in index.tolist()] == ["0", "1", "2", "3", "4plus", "4plus", "unreached"]
    names, index = groups["degree"]
    assert [names[i] for i in index.tolist()] == ["1", "2to3", "2to3", "2to3", "2to3", "1", "0"]


def structure_buckets(metrics: dict, name: str) -> tuple[dict, dict]:
    """``test_nodes_<name>_*`` counts and ``test_top1_<name>_*`` accuracies of a result row or an MLflow run."""
    counts = {k.rsplit("_", 1)[1]: v for k, v in metrics.items() if k.startswith(f"test_nodes_{name}_")}
    return counts, {k.rsplit("_", 1)[1]: v for k, v in metrics.items() if k.startswith(f"test_top1_{name}_")}


def test_top1_by_structure_partitions_the_test_nodes(tmp_path):
    """Each stage's row holds top-1 by degree and by hops bucket: the buckets' node counts add up to the test
    nodes and their count-weighted top-1s to the stage's ``test_top1``."""
    result = kdray.distill(graph_job(tmp_path, epochs=2, baseline=False), quiet=True, log=lambda *a: None)
    tests = len(build_datasets("digits_graph", label_fraction=0.05).graph.test)
    assert [s["kind"] for s in result.stages] == ["graph_teacher", "graph_distill"]
    for row in result.stages:
        for name in ("degree", "hops"):
            counts, tops = structure_buckets(row, name)
            assert sum(counts.values()) == tests and set(tops) == set(counts) and len(counts) >= 2, row
            mean = sum(tops[b] * counts[b] for b in counts) / tests
            assert mean == pytest.approx(row["test_top1"], abs=1e-6)


@pytest.mark.slow
def test_top1_by_structure_is_logged_per_stage_and_plotted_on_the_jobs_run(tmp_path, mlflow_uri):
    """The same metrics in each stage's MLflow run; the job's run holds ``accuracy_by_structure.png``."""
    from mlflow.tracking import MlflowClient
    from PIL import Image

    result = kdray.distill(graph_job(tmp_path, epochs=2, baseline=False, mlflow={"tracking_uri": mlflow_uri}),
                           quiet=True, log=lambda *a: None)
    client = MlflowClient(mlflow_uri)
    parent = client.get_run(result.parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    rows = {s["name"]: s for s in result.stages}
    assert {r.info.run_name for r in runs} == set(rows) == {"teacher", "glnn-seed0"}
    for run in runs:
        row = rows[run.info.run_name]
        for name in ("degree", "hops"):
            assert structure_buckets(run.data.metrics, name) == pytest.approx(structure_buckets(row, name))
    assert "accuracy_by_structure.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    path = client.download_artifacts(parent.info.run_id, "accuracy_by_structure.png", str(tmp_path))
    assert min(Image.open(path).size) > 200


def test_preflight_builds_each_node_model_once(tmp_path, monkeypatch):
    """The width check sits where the generic preflight builds the models: a graph job's preflight builds the
    teacher and the student once each (the scheme's data check builds none)."""
    from kdray.models.graph import NodeModel
    from kdray.orchestrator.api import preflight

    built = []
    original = NodeModel.__init__

    def counting(self, layer, *args, **kwargs):
        built.append(layer.__name__)
        original(self, layer, *args, **kwargs)

    monkeypatch.setattr(NodeModel, "__init__", counting)
    preflight(kdray.load_config(graph_job(tmp_path)))
    assert sorted(built) == ["GCNLayer", "Linear"]


# --- the methods on digits_graph ---------------------------------------------------------------------------
def by_kind(result, kind):
    return [s["test_top1"] for s in result.stages if s["kind"] == kind]


def test_glnn_mlp_beats_the_mlp_on_labels_alone_and_needs_no_edges(tmp_path):
    """digits kNN graph (k = 10), 5 % of the 1797 nodes labelled (90), GCN teacher (hidden 64), MLP student
    (hidden 64), AdamW lr 0.01, 200 full-graph epochs, GLNN lam 0.5, T 1, seeds 0..2. Measured (2-core CPU,
    2026-12-02): teacher 0.930, MLP alone 0.849, GLNN 0.919 (0.925 / 0.916 / 0.916); inference over every node
    5.96 ms (GCN with its 24,664 edges) vs 0.37 ms (the MLP, features only). By hops to the nearest labelled
    node (1 / 2 / 3 hops: 177 / 166 / 16 test nodes; 2026-12-03): teacher 0.966 / 0.904 / 0.812, MLP alone 0.944 /
    0.771 / 0.604, GLNN 0.974 / 0.876 / 0.771. Asserted: GLNN >= MLP alone + 0.04, >= teacher - 0.04; GLNN's gain
    over the MLP alone at 2 hops >= its gain at 1 hop + 0.03 (measured 0.105 vs 0.030: the teacher's soft labels
    carry the graph to nodes no label is near); the student's predictions do not change without edges (the
    teacher's do)."""
    result = kdray.distill(graph_job(tmp_path, seeds=[0, 1, 2]), quiet=True, log=lambda *a: None)
    [teacher] = by_kind(result, "graph_teacher")
    alone, glnn = statistics.mean(by_kind(result, "graph_scratch")), statistics.mean(by_kind(result, "graph_distill"))
    assert glnn >= alone + 0.04 and glnn >= teacher - 0.04, (teacher, alone, glnn)

    def gain(hops):
        return statistics.mean(s[f"test_top1_hops_{hops}"] for s in result.stages if s["kind"] == "graph_distill") - \
            statistics.mean(s[f"test_top1_hops_{hops}"] for s in result.stages if s["kind"] == "graph_scratch")

    assert gain(2) >= gain(1) + 0.03, (gain(1), gain(2))
    rows = {s["kind"]: s for s in result.stages}
    assert rows["graph_distill"]["inference_ms"] < rows["graph_teacher"]["inference_ms"]
    graph = build_datasets("digits_graph", label_fraction=0.05).graph
    student, gnn = create_model("node_mlp", 10), create_model("gcn", 10)
    for model in (student, gnn):
        model.eval()
    none = torch.empty(2, 0, dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(student(graph.x, graph.edge_index), student(graph.x, none))
        assert not torch.allclose(gnn(graph.x, graph.edge_index), gnn(graph.x, none))


@pytest.mark.slow
def test_lsp_gcn_beats_the_same_gcn_alone(tmp_path):
    """A GCN of hidden 8 taught by the GCN of hidden 64 with LSP (rbf kernel, weight 10) vs the same GCN on the
    labels alone, seeds 0..2. Measured (2026-12-02): alone 0.841 / 0.889 / 0.638 (mean 0.789), LSP 0.900 / 0.883 /
    0.880 (mean 0.888). Asserted: LSP's mean >= alone's + 0.04."""
    result = kdray.distill(graph_job(tmp_path, "lsp", {"model": "gcn", "args": {"hidden": 8}}, seeds=[0, 1, 2]),
                           quiet=True, log=lambda *a: None)
    alone, lsp = statistics.mean(by_kind(result, "graph_scratch")), statistics.mean(by_kind(result, "graph_distill"))
    assert lsp >= alone + 0.04, (alone, lsp)


class StudentWeights:
    """The taught student's weights after each epoch (on each Ray Train worker: per rank, in ``folder``)."""

    def __init__(self, folder=None, stop_after=None):
        self.folder, self.stop_after, self.states = folder, stop_after, {}

    def on_epoch_end(self, epoch, metrics, loop):
        if metrics["kind"] != "graph_distill":
            return
        state = copy.deepcopy(loop.state_dict()["distiller"])
        if self.folder is None:
            self.states[epoch] = state
        else:
            import torch.distributed as dist

            torch.save(state, f"{self.folder}/rank{dist.get_rank()}-epoch{epoch}.pt")
        if epoch == self.stop_after:
            raise KeyboardInterrupt


def test_resume_gives_the_uninterrupted_weights(tmp_path):
    over = dict(baseline=False, checkpoint={"every_epochs": 1})
    whole = StudentWeights()
    kdray.distill(graph_job(tmp_path / "whole", epochs=4, **over), callbacks=[whole], quiet=True, log=lambda *a: None)
    cfg = graph_job(tmp_path / "cut", epochs=4, **over)
    with pytest.raises(KeyboardInterrupt):
        kdray.distill(cfg, callbacks=[StudentWeights(stop_after=1)], quiet=True, log=lambda *a: None)
    resumed = StudentWeights()
    kdray.distill(cfg, resume=True, callbacks=[resumed], quiet=True, log=lambda *a: None)
    assert sorted(resumed.states) == [2, 3]
    for key, value in whole.states[3].items():
        torch.testing.assert_close(resumed.states[3][key], value, rtol=0, atol=0, msg=key)


@pytest.mark.ray
def test_glnn_on_two_ray_train_workers_keeps_one_student(tmp_path, ray_session):
    """GLNN on 2 Ray Train workers (gloo): each rank takes half of the labelled and of the distilled nodes, DDP
    averages the gradients, so both ranks hold the same student after every epoch; the run is tested."""
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    folder = tmp_path / "per-rank"
    folder.mkdir()
    cfg = graph_job(tmp_path, epochs=3, baseline=False, ray={"num_workers": 2})
    result = kdray.distill(cfg, callbacks=[StudentWeights(str(folder))], quiet=True)
    assert by_kind(result, "graph_distill")[0] > 0.1
    for epoch in range(3):
        a, b = (torch.load(folder / f"rank{r}-epoch{epoch}.pt", weights_only=True) for r in (0, 1))
        for key, value in a.items():
            torch.testing.assert_close(b[key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.ray
def test_glnn_lambda_is_searchable(tmp_path, ray_session):
    """``kdray sweep`` over GLNN's ``lam``: the base trains the GCN teacher once, each trial's MLP is taught by
    that teacher (its checkpoint) and scored by its val top-1."""
    from kdray.orchestrator.checkpoints import LocalCheckpoints

    base = graph_job(tmp_path, epochs=20)
    result = kdray.sweep({"graph.lam": {"float": [0.1, 0.9]}}, base, num_samples=2, asha=False, name="glnn-sweep",
                         output_dir=str(tmp_path / "out"), verbose=0, log=lambda m: None)
    assert len(result.trials) == 2 and (result.trials["status"] == "complete").all(), result.trials
    for _, row in result.trials.iterrows():
        [stage] = LocalCheckpoints(row["run_dir"]).latest()["done"].values()
        assert stage["kind"] == "graph_distill" and row["val_top1"] == pytest.approx(stage["val_top1"])
        assert stage["val_top1"] > 0.5


def test_inductive_setting_hides_the_test_nodes_edges_while_training(tmp_path):
    graph = Graph(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]), torch.tensor([[0, 1, 2, 3], [1, 2, 3, 0]]),
                  torch.tensor([0]), torch.tensor([1]), torch.tensor([3]), 2)
    assert graph.without_nodes(graph.test).edge_index.tolist() == [[0, 1], [1, 2]]
    result = kdray.distill(graph_job(tmp_path, epochs=30, graph={"method": "glnn", "setting": "inductive"}),
                           quiet=True, log=lambda *a: None)
    rows = {s["kind"]: s for s in result.stages}
    assert rows["graph_distill"]["graph_setting"] == "inductive" and rows["graph_distill"]["test_top1"] > 0.5
