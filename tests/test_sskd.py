"""SSKD (Xu et al., ECCV 2020): rotated views, the teacher's error-level ranking and all four losses by hand on
fixed tensors (projection head pinned to the identity); the distiller running both models on the views; a
teacher cache and mis-shaped inputs refused in one line.

Gradient flow and the short digits training are checked for every registered method in test_every_method.py."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from kdray.algorithms import create_method, get_method
from kdray.algorithms.base import Batch, ModelOutput
from kdray.algorithms.distiller import Distiller
from kdray.algorithms.relation.sskd import confident_rows, rank_of, rotated_views
from kdray.config import ConfigError, load_config
from kdray.models import create_model
from tests.method_harness import make_pair

pytestmark = pytest.mark.usefixtures("one_thread")

# N = 2 samples, 3 classes, 2-d embeddings; view row r is a rotation of sample r % 2
Y = [2, 0]
S_Z, T_Z = [[0.5, 0.0, 1.0], [1.0, 0.5, -0.5]], [[0.0, 0.0, 2.0], [1.5, 0.0, 0.0]]
S_ZV = [[0.2, 0.1, 0.3], [0.0, 1.0, 0.0], [1.0, 0.0, 0.5], [0.3, 0.3, 0.0], [0.0, 0.5, 0.5], [1.0, 1.0, 0.0]]
# the teacher on the views: true class first in rows 0, 1, 3, 5; rows 2 (argmax 0) and 4 (argmax 1) wrong
T_ZV = [[0.0, 0.0, 1.0], [2.0, 0.0, 0.0], [1.0, 0.0, 0.5], [1.0, 0.5, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 0.0]]
S_E, S_EV = [[1.0, 0.5], [0.2, 1.0]], [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.3, 1.0], [1.0, 1.0], [0.1, 0.9]]
T_E = [[1.0, 0.0], [0.0, 1.0]]
# the teacher's view embeddings: rows 1 and 2 are closer to the other sample's normal embedding (wrong)
T_EV = [[1.0, 0.2], [1.0, 0.1], [0.1, 1.0], [0.3, 1.0], [1.0, 0.5], [0.2, 1.0]]


def _log_softmax(row, t):
    m = max(v / t for v in row)
    lse = m + math.log(sum(math.exp(v / t - m) for v in row))
    return [v / t - lse for v in row]


def _kl_rows(s_rows, t_rows, t):
    total = 0.0
    for s, q in zip(s_rows, t_rows):
        ls, lt = _log_softmax(s, t), _log_softmax(q, t)
        total += sum(math.exp(b) * (b - a) for a, b in zip(ls, lt))
    return t * t * total / len(s_rows)


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _sim(aug, nor):
    return [[_cos(a, n) for n in nor] for a in aug]


def _t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def built_term(**params):
    term = create_method("sskd", **params)
    term.student_points, term.teacher_points = ["s"], ["t"]
    student = ModelOutput(_t(S_Z), {"s": _t(S_E)})
    term.build(student, ModelOutput(_t(T_Z), {"t": _t(T_E)}), 2)
    term.double()
    with torch.no_grad():  # Linear-ReLU-Linear -> identity on the non-negative student embeddings
        for layer in (term.head[0], term.head[2]):
            layer.weight.copy_(torch.eye(2, dtype=torch.float64))
            layer.bias.zero_()
    student.views = ModelOutput(_t(S_ZV), {"s": _t(S_EV)})
    teacher = ModelOutput(_t(T_Z), {"t": _t(T_E)})
    teacher.views = ModelOutput(_t(T_ZV), {"t": _t(T_EV)})
    return term, student, teacher


def _batch():
    return Batch(torch.zeros(2, 1, 4, 4, dtype=torch.float64), torch.tensor(Y), torch.arange(2))


def test_registered_with_the_official_defaults():
    cls = get_method("sskd")
    assert cls.kind == "relation" and "Self-Supervision" in cls.paper and cls.provides_ce and cls.needs_teacher
    term = create_method("sskd")
    assert (term.ce_weight, term.kd_weight, term.tf_weight, term.ss_weight) == (0.1, 0.9, 2.7, 10.0)
    assert (term.temperature, term.ss_temperature, term.ratio_tf, term.ratio_ss) == (4.0, 0.5, 1.0, 0.75)


def test_rotated_views_view_major_and_non_square_refused():
    img = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[5.0, 6.0], [7.0, 8.0]]]])
    views = rotated_views(img)
    assert views.shape == (6, 1, 2, 2)
    assert views[0, 0].tolist() == [[2.0, 4.0], [1.0, 3.0]]  # sample 0 turned 90 degrees anticlockwise
    assert views[1, 0].tolist() == [[6.0, 8.0], [5.0, 7.0]]  # sample 1, same turn
    assert views[2, 0].tolist() == [[4.0, 3.0], [2.0, 1.0]] and views[4, 0].tolist() == [[3.0, 1.0], [4.0, 2.0]]
    with pytest.raises(ValueError, match=r"square image batches \(N, C, H, H\), got \(2, 1, 2, 3\)"):
        rotated_views(torch.zeros(2, 1, 2, 3))


def test_error_level_ranking_by_hand():
    scores = torch.tensor([[3.0, 1.0, 2.0], [3.0, 1.0, 2.0], [0.0, 5.0, 1.0], [1.0, 0.0, 2.0]])
    targets = torch.tensor([0, 1, 2, 2])
    assert rank_of(scores, targets).tolist() == [0, 2, 1, 0]
    assert confident_rows(scores, targets, 1.0).tolist() == [0, 1, 2, 3]
    assert confident_rows(scores, targets, 0.5).tolist() == [0, 2, 3]  # of the 2 wrong, the better-ranked one
    assert confident_rows(scores, targets, 0.0).tolist() == [0, 3]


def test_all_four_losses_by_hand():
    term, student, teacher = built_term(ratio_tf=0.0, ratio_ss=0.5)
    out = term(student, teacher, _batch())
    assert set(out) == {"ce", "sskd_kd", "sskd_tf", "sskd_ss"}
    ce = -sum(_log_softmax(S_Z[n], 1.0)[Y[n]] for n in range(2)) / 2
    kd = _kl_rows(S_Z, T_Z, 4.0)
    tf_rows = [0, 1, 3, 5]  # ratio_tf = 0: only the views whose true class the teacher ranks first
    tf = _kl_rows([S_ZV[r] for r in tf_rows], [T_ZV[r] for r in tf_rows], 4.0)
    s_sim, t_sim = _sim(S_EV, S_E), _sim(T_EV, T_E)
    # teacher's similarity ranking: rows 1, 2 wrong (rank 1); ratio_ss = 0.5 keeps 1 of them, the first (row 1)
    ss_rows = [0, 1, 3, 4, 5]
    ss = _kl_rows([s_sim[r] for r in ss_rows], [t_sim[r] for r in ss_rows], 0.5)
    for key, value, weight in (("ce", ce, 0.1), ("sskd_kd", kd, 0.9), ("sskd_tf", tf, 2.7), ("sskd_ss", ss, 10.0)):
        assert out[key].item() == pytest.approx(weight * value, rel=1e-9), key


def test_gradients_reach_student_and_head_not_the_teacher_side():
    term, student, teacher = built_term()
    for out in (student, student.views):
        out.logits.requires_grad_(True)
        next(iter(out.features.values())).requires_grad_(True)
    for out in (teacher, teacher.views):
        out.logits.requires_grad_(True)
        next(iter(out.features.values())).requires_grad_(True)
    sum(term(student, teacher, _batch()).values()).backward()
    assert student.views.logits.grad.abs().sum() > 0 and student.views.features["s"].grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in term.head.parameters())
    assert all(t.grad is None for o in (teacher, teacher.views) for t in (o.logits, o.features["t"]))


def test_the_distiller_runs_both_models_on_the_views():
    distiller, teacher, batch = make_pair("sskd")
    n = batch.inputs.shape[0]
    seen = []
    hook = teacher.model.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    _logits, losses = distiller(batch, teacher(batch.inputs))
    hook.remove()
    assert seen == [n, 3 * n]  # the normal batch (the loop's call), then the distiller's on the rotations
    assert set(losses) == {"ce", "sskd_kd", "sskd_tf", "sskd_ss"} and all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match="run it through Distiller"):
        points = distiller.terms[0].student_points
        distiller.terms[0](ModelOutput(torch.zeros(n, 10), {p: torch.zeros(n, 4) for p in points}),
                           ModelOutput(torch.zeros(n, 10)), batch)


class FakeCache(nn.Module):
    wants_batch = True


def test_a_teacher_cache_or_no_teacher_refused_in_one_line():
    for teacher, what in ((FakeCache(), "a teacher cache"), (None, "no teacher")):
        distiller = Distiller(create_model("digits_cnn", 10, width=4), [create_method("sskd")])
        with pytest.raises(ValueError, match=rf"'sskd' runs the teacher on extra views .* has {what}; give one live"):
            distiller.build(torch.zeros(2, 1, 8, 8), teacher, 10)
    raw = {"student": {"model": "digits_cnn"}, "methods": [{"name": "sskd"}],
           "teacher": {"model": "digits_cnn", "cache": "/tmp/kdray-no-such-cache"}}
    with pytest.raises(ConfigError, match="'sskd' runs the teacher on extra views.*drop teacher.cache"):
        load_config(raw)


def test_mis_shaped_outputs_refused_naming_both_shapes():
    term, student, teacher = built_term()
    teacher.logits = torch.zeros(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"student logits \(2, 3\) / views \(6, 3\) and teacher logits \(2, 4\)"):
        term(student, teacher, _batch())
    term, student, teacher = built_term()
    student.views = ModelOutput(_t(S_ZV[:4]), {"s": _t(S_EV[:4])})
    teacher.views = ModelOutput(_t(T_ZV[:4]), {"t": _t(T_EV[:4])})
    with pytest.raises(ValueError, match="4 view outputs for a batch of 2"):
        term(student, teacher, _batch())
