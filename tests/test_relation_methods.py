"""Relation-based terms (SP, CC, RKD, FSP, IRG, CRD): hand-derived values, gradients, training."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from kdray.algorithms import create_method, list_methods
from kdray.algorithms.base import Batch, ModelOutput
from kdray.algorithms.distiller import Distiller, Teacher
from kdray.models import create_model

METHODS = ["sp", "cc", "rkd", "fsp", "irg", "crd"]  # registered with metadata; trained in test_every_method.py


def _term(name, points=("p",), **params):
    term = create_method(name, **params)
    term.student_points = list(points)
    term.teacher_points = list(points)
    return term


def _out(features: dict, logits=None, batch=3):
    logits = torch.zeros(batch, 4) if logits is None else torch.tensor(logits)
    return ModelOutput(logits, {k: torch.tensor(v) for k, v in features.items()})


def _batch(n=3, indices=None):
    idx = torch.arange(n) if indices is None else torch.tensor(indices)
    return Batch(torch.zeros(n, 1), torch.zeros(n, dtype=torch.long), idx)


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _unit(v):
    n = math.sqrt(_dot(v, v))
    return [x / n for x in v]


def _huber(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


FS = [[1.0, 2.0], [0.5, -1.0], [2.0, 0.0]]  # student: 3 samples x 2 features
FT = [[0.0, 1.0, 2.0], [1.0, 1.0, -1.0], [3.0, 0.5, 0.5]]  # teacher: 3 samples x 3 features


# --------------------------------------------------------------------------------------- registry
def test_methods_registered_with_metadata():
    methods = list_methods()
    for name in METHODS:
        cls = methods[name]
        assert cls.name == name and cls.kind == "relation" and cls.paper
    assert methods["sp"].default_student_points == "stages"
    assert methods["fsp"].default_student_points == "stages"
    assert methods["irg"].default_student_points == "stages"
    for name in ("rkd", "cc", "crd"):
        assert methods[name].default_student_points == "embedding"
        assert methods[name].default_teacher_points == "embedding"
    defaults = {"sp": 3000.0, "cc": 0.02, "rkd": 1.0, "fsp": 50.0, "crd": 0.8}
    for name, weight in defaults.items():
        assert create_method(name).weight == weight
    rkd = create_method("rkd")
    assert (rkd.distance_weight, rkd.angle_weight) == (25.0, 50.0)
    crd = create_method("crd")
    assert (crd.nce_k, crd.temperature, crd.momentum) == (16384, 0.07, 0.5)


# --------------------------------------------------------------------------------------------- SP
def test_sp_value_by_hand():
    term = _term("sp", weight=10.0)
    out = term(_out({"p": FS}), _out({"p": FT}), _batch())

    def g_tilde(q):
        g = [[_dot(a, b) for b in q] for a in q]
        return [_unit(row) for row in g]

    gs, gt = g_tilde(FS), g_tilde(FT)
    expected = sum((gt[i][j] - gs[i][j]) ** 2 for i in range(3) for j in range(3)) / 9
    assert out["sp"].item() == pytest.approx(10.0 * expected, rel=1e-5)


def test_sp_uses_last_stage_by_default():
    s = {"a": torch.randn(4, 3, 2, 2), "b": torch.randn(4, 5)}
    t = {"a": torch.randn(4, 6, 2, 2), "b": torch.randn(4, 2)}
    last = _term("sp", points=("a", "b"))(ModelOutput(torch.zeros(4, 2), s), ModelOutput(torch.zeros(4, 2), t),
                                          _batch(4))["sp"]
    only_b = _term("sp", points=("b",))(ModelOutput(torch.zeros(4, 2), s), ModelOutput(torch.zeros(4, 2), t),
                                        _batch(4))["sp"]
    both = _term("sp", points=("a", "b"), layers="all")(ModelOutput(torch.zeros(4, 2), s),
                                                       ModelOutput(torch.zeros(4, 2), t), _batch(4))["sp"]
    only_a = _term("sp", points=("a",))(ModelOutput(torch.zeros(4, 2), s), ModelOutput(torch.zeros(4, 2), t),
                                        _batch(4))["sp"]
    assert last.item() == pytest.approx(only_b.item())
    assert both.item() == pytest.approx(only_a.item() + only_b.item(), rel=1e-5)


# --------------------------------------------------------------------------------------------- CC
def test_cc_value_by_hand():
    gamma, order = 0.4, 2
    out = _term("cc", weight=2.0)(_out({"p": FS}), _out({"p": FT}), _batch())

    def psi(feats):
        f = [_unit(v) for v in feats]
        return [[sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * _dot(a, b) ** p
                     for p in range(order + 1)) for b in f] for a in f]

    ps, pt = psi(FS), psi(FT)
    expected = sum((pt[i][j] - ps[i][j]) ** 2 for i in range(3) for j in range(3)) / 9
    assert out["cc"].item() == pytest.approx(2.0 * expected, rel=1e-5)


def test_cc_taylor_kernel_converges_to_gaussian_rbf():
    from kdray.algorithms.relation.cc import taylor_rbf_correlation

    gamma = 0.4
    f = torch.nn.functional.normalize(torch.tensor(FT), dim=1)
    exact = torch.exp(-gamma * torch.cdist(f, f).pow(2))
    assert torch.allclose(taylor_rbf_correlation(torch.tensor(FT), gamma, order=12), exact, atol=1e-6)
    assert torch.allclose(taylor_rbf_correlation(torch.tensor(FT), gamma, order=2), exact, atol=0.1)


# -------------------------------------------------------------------------------------------- RKD
def test_rkd_value_by_hand():
    s = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [1.5, 1.5]]
    t = [[0.0, 0.0, 1.0], [2.0, 1.0, 0.0], [0.5, 3.0, 1.0], [-1.0, 1.0, 1.0]]
    term = _term("rkd", weight=2.0, distance_weight=3.0, angle_weight=5.0)
    out = term(_out({"p": s}, batch=4), _out({"p": t}, batch=4), _batch(4))

    def dist(e):
        pairs = [(i, j) for i in range(4) for j in range(4) if i != j]
        d = {p: math.dist(e[p[0]], e[p[1]]) for p in pairs}
        mu = sum(d.values()) / len(d)
        return {p: v / mu for p, v in d.items()}

    def angle(e):
        out = {}
        for i, j, k in itertools.permutations(range(4), 3):
            u = _unit([a - b for a, b in zip(e[i], e[j])])
            v = _unit([a - b for a, b in zip(e[k], e[j])])
            out[(i, j, k)] = _dot(u, v)
        return out

    ds, dt = dist(s), dist(t)
    as_, at = angle(s), angle(t)
    exp_d = sum(_huber(ds[p] - dt[p]) for p in ds) / len(ds)
    exp_a = sum(_huber(as_[p] - at[p]) for p in as_) / len(as_)
    assert len(ds) == 12 and len(as_) == 24
    assert out["rkd_distance"].item() == pytest.approx(2.0 * 3.0 * exp_d, rel=1e-5)
    assert out["rkd_angle"].item() == pytest.approx(2.0 * 5.0 * exp_a, rel=1e-5)


def test_rkd_invariant_to_teacher_scale():
    torch.manual_seed(0)
    s, t = torch.randn(6, 5), torch.randn(6, 7)
    term = _term("rkd")
    a = term(ModelOutput(torch.zeros(6, 2), {"p": s}), ModelOutput(torch.zeros(6, 2), {"p": t}), _batch(6))
    b = term(ModelOutput(torch.zeros(6, 2), {"p": s}), ModelOutput(torch.zeros(6, 2), {"p": 10 * t}), _batch(6))
    for k in a:
        assert a[k].item() == pytest.approx(b[k].item(), rel=1e-4)


# -------------------------------------------------------------------------------------------- FSP
def test_fsp_value_by_hand():
    # Two points per model: a 2x2 map and a 1x1 map with the same channels on both sides (no connector).
    s1 = [[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [0.0, 1.0]]], [[[2.0, 0.0], [0.0, 2.0]], [[1.0, 1.0], [1.0, 3.0]]]]
    t1 = [[[[0.0, 2.0], [2.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]], [[[4.0, 0.0], [0.0, 0.0]], [[2.0, 2.0], [0.0, 0.0]]]]
    s2 = [[[[1.0]], [[-1.0]], [[2.0]]], [[[0.5]], [[0.0]], [[1.0]]]]
    t2 = [[[[2.0]], [[0.0]], [[1.0]]], [[[1.0]], [[1.0]], [[-1.0]]]]
    term = _term("fsp", points=("a", "b"), weight=3.0)
    s_out = ModelOutput(torch.zeros(2, 2), {"a": torch.tensor(s1), "b": torch.tensor(s2)})
    t_out = ModelOutput(torch.zeros(2, 2), {"a": torch.tensor(t1), "b": torch.tensor(t2)})
    term.build(s_out, t_out, 0)
    assert len(term.connectors) == 0
    out = term(s_out, t_out, _batch(2))

    def fsp(first, second):  # first pooled from 2x2 to 1x1 (average), then G_ij = f1_i * f2_j / (1 * 1)
        f1 = [sum(sum(row) for row in ch) / 4 for ch in first]
        f2 = [ch[0][0] for ch in second]
        return [[a * b for b in f2] for a in f1]

    sq = 0.0
    for n in range(2):
        gs, gt = fsp(s1[n], s2[n]), fsp(t1[n], t2[n])
        sq += sum((gt[i][j] - gs[i][j]) ** 2 for i in range(2) for j in range(3))
    assert out["fsp"].item() == pytest.approx(3.0 * sq / (2 * 2 * 3), rel=1e-5)


def test_fsp_connectors_when_channels_differ_and_two_stage_schedule():
    s = {"a": torch.randn(4, 3, 4, 4), "b": torch.randn(4, 5, 2, 2)}
    t = {"a": torch.randn(4, 6, 4, 4), "b": torch.randn(4, 5, 2, 2)}
    term = _term("fsp", points=("a", "b"), init_epochs=2)
    s_out, t_out = ModelOutput(torch.zeros(4, 2), s), ModelOutput(torch.zeros(4, 2), t)
    term.build(s_out, t_out, 0)
    assert set(term.connectors) == {"0"} and term.connectors["0"].out_channels == 6
    term.set_epoch(1)
    assert not term.uses_hard_labels() and term(s_out, t_out, _batch(4))["fsp"].item() > 0
    term.set_epoch(2)
    assert term.uses_hard_labels() and term(s_out, t_out, _batch(4))["fsp"].item() == 0.0
    # In a distiller the hard-label CE is dropped during the FSP-only epochs.
    student, teacher_model = create_model("digits_cnn", 10, width=4), create_model("digits_cnn", 10, width=8)
    distiller = Distiller(student, [create_method("fsp", init_epochs=1)])
    teacher = Teacher(teacher_model, distiller.resolve_teacher_points(teacher_model))
    x = torch.rand(4, 1, 8, 8)
    distiller.build(x, teacher, 4)
    batch = Batch(x, torch.tensor([0, 1, 2, 3]), torch.arange(4))
    distiller.set_epoch(0)
    assert set(distiller(batch, teacher(x))[1]) == {"fsp"}
    distiller.set_epoch(1)
    assert set(distiller(batch, teacher(x))[1]) == {"ce", "fsp"}


# -------------------------------------------------------------------------------------------- IRG
def test_irg_value_by_hand():
    s_a, s_b = [[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], [[0.5, 0.5], [2.0, 0.0], [0.0, -1.0]]
    t_a, t_b = [[2.0, 1.0], [0.0, 0.0], [1.0, 3.0]], [[1.0, 1.0], [0.0, 1.0], [2.0, 2.0]]
    z_s = [[1.0, 0.0, 2.0, 0.0], [1.0, 0.0, 2.0, 0.0], [0.0, 1.0, 0.0, 1.0]]
    z_t = [[2.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 3.0], [1.0, -1.0, 0.0, 2.0]]
    term = _term("irg", points=("a", "b"), weight=2.0, vertex_weight=0.1, edge_weight=5.0, transform_weight=7.0)
    out = term(_out({"a": s_a, "b": s_b}, logits=z_s), _out({"a": t_a, "b": t_b}, logits=z_t), _batch())

    def mse(xs, ys):
        return sum((x - y) ** 2 for x, y in zip(xs, ys)) / len(xs)

    def edges(f):
        a = [math.dist(u, v) ** 2 for u in f for v in f]
        return [x / max(a) for x in a]

    def trans(f1, f2):
        lam = [math.dist(u, v) ** 2 for u, v in zip(f1, f2)]
        return [x / max(lam) for x in lam]

    vertex = mse(sum(z_s, []), sum(z_t, []))
    edge = (mse(edges(s_a), edges(t_a)) + mse(edges(s_b), edges(t_b)) + mse(edges(z_s), edges(z_t))) / 3
    transform = mse(trans(s_a, s_b), trans(t_a, t_b))
    assert out["irg_vertex"].item() == pytest.approx(2.0 * 0.1 * vertex, rel=1e-5)
    assert out["irg_edge"].item() == pytest.approx(2.0 * 5.0 * edge, rel=1e-5)
    assert out["irg_transform"].item() == pytest.approx(2.0 * 7.0 * transform, rel=1e-5)


def test_irg_transformation_pools_space_and_channel_groups():
    from kdray.algorithms.relation.irg import transformation_vector

    torch.manual_seed(0)
    shallow, deep = torch.randn(3, 2, 4, 4), torch.randn(3, 4, 2, 2)
    a = torch.nn.functional.avg_pool2d(shallow, 2)  # 4x4 -> 2x2
    b = (deep[:, 0::2] + deep[:, 1::2]) / 2  # 4 channels -> 2, averaging adjacent pairs
    lam = (a - b).flatten(1).pow(2).sum(1)
    assert torch.allclose(transformation_vector(shallow, deep), lam / lam.max(), atol=1e-6)


# -------------------------------------------------------------------------------------------- CRD
def _crd_fixture():
    torch.manual_seed(0)
    term = _term("crd", weight=0.5, feat_dim=2, nce_k=2, temperature=0.5, momentum=0.5)
    f_s = [[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]]  # 2 samples, student embedding dim 3
    f_t = [[0.5, 1.0], [2.0, -1.0]]  # teacher embedding dim 2
    s_out, t_out = _out({"p": f_s}, batch=2), _out({"p": f_t}, batch=2)
    term.build(s_out, t_out, num_samples=5)
    w_s, b_s = [[1.0, 0.0, 1.0], [0.0, 2.0, 0.0]], [0.0, 0.5]
    w_t, b_t = [[1.0, 1.0], [-1.0, 2.0]], [0.1, 0.0]
    bank_s = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-0.8, 0.6], [0.0, -1.0]]
    bank_t = [[0.0, 1.0], [1.0, 0.0], [-0.6, 0.8], [0.8, -0.6], [-1.0, 0.0]]
    with torch.no_grad():
        term.embed_s.linear.weight.copy_(torch.tensor(w_s))
        term.embed_s.linear.bias.copy_(torch.tensor(b_s))
        term.embed_t.linear.weight.copy_(torch.tensor(w_t))
        term.embed_t.linear.bias.copy_(torch.tensor(b_t))
        term.bank_s.copy_(torch.tensor(bank_s))
        term.bank_t.copy_(torch.tensor(bank_t))
    negatives = [[4, 0], [2, 2]]
    term.sample_negatives = lambda pos: torch.tensor(negatives)
    return term, s_out, t_out, dict(f_s=f_s, f_t=f_t, w_s=w_s, b_s=b_s, w_t=w_t, b_t=b_t, bank_s=bank_s,
                                    bank_t=bank_t, negatives=negatives)


def test_crd_value_by_hand():
    term, s_out, t_out, p = _crd_fixture()
    positives = [1, 3]
    term.train()
    out = term(s_out, t_out, _batch(2, positives))

    def embed(w, b, f):
        return _unit([_dot(row, f) + bias for row, bias in zip(w, b)])

    v_s = [embed(p["w_s"], p["b_s"], f) for f in p["f_s"]]
    v_t = [embed(p["w_t"], p["b_t"], f) for f in p["f_t"]]
    tau, m_data, k, eps = 0.5, 5, 2, 1e-7
    idx = [[pos] + neg for pos, neg in zip(positives, p["negatives"])]
    # student anchor against the teacher bank, teacher anchor against the student bank
    e_s = [[math.exp(_dot(p["bank_t"][j], v_s[i]) / tau) for j in idx[i]] for i in range(2)]
    e_t = [[math.exp(_dot(p["bank_s"][j], v_t[i]) / tau) for j in idx[i]] for i in range(2)]
    z_s = m_data * sum(sum(r) for r in e_s) / 6
    z_t = m_data * sum(sum(r) for r in e_t) / 6
    noise = k / m_data

    def nce(rows, z):
        total = 0.0
        for row in rows:
            pr = [x / z for x in row]
            total -= math.log(pr[0] / (pr[0] + noise + eps))
            total -= sum(math.log(noise / (x + noise + eps)) for x in pr[1:])
        return total / len(rows)

    expected = 0.5 * (nce(e_s, z_s) + nce(e_t, z_t))
    assert out["crd"].item() == pytest.approx(expected, rel=1e-5)
    assert term.z.tolist() == pytest.approx([z_s, z_t], rel=1e-5)
    # memory banks: momentum update of the positives, renormalised; other rows untouched
    for i, pos in enumerate(positives):
        assert term.bank_s[pos].tolist() == pytest.approx(
            _unit([0.5 * a + 0.5 * b for a, b in zip(p["bank_s"][pos], v_s[i])]), rel=1e-5)
        assert term.bank_t[pos].tolist() == pytest.approx(
            _unit([0.5 * a + 0.5 * b for a, b in zip(p["bank_t"][pos], v_t[i])]), rel=1e-5)
    for row in (0, 2, 4):
        assert term.bank_s[row].tolist() == pytest.approx(p["bank_s"][row])


def test_crd_z_frozen_banks_checkpointed_and_eval_is_read_only():
    term, s_out, t_out, _ = _crd_fixture()
    term.eval()
    before = term.bank_s.clone()
    term(s_out, t_out, _batch(2, [1, 3]))
    assert torch.equal(term.bank_s, before) and (term.z < 0).all()
    term.train()
    term(s_out, t_out, _batch(2, [1, 3]))
    z = term.z.clone()
    term(s_out, t_out, _batch(2, [0, 2]))
    assert torch.equal(term.z, z)
    state = term.state_dict()
    assert {"bank_s", "bank_t", "z"} <= set(state) and state["bank_s"].shape == (5, 2)
    assert term.nce_k == 2 and _term("crd", nce_k=16384).nce_k == 16384


def test_crd_clips_nce_k_and_samples_uniformly():
    term = _term("crd")
    term.build(_out({"p": FS}), _out({"p": FT}), num_samples=10)
    assert term.nce_k == 9
    neg = term.sample_negatives(torch.arange(3))
    assert neg.shape == (3, 9) and neg.min() >= 0 and neg.max() < 10
    with pytest.raises(ValueError, match="num_samples"):
        _term("crd").build(_out({"p": FS}), _out({"p": FT}), num_samples=0)


