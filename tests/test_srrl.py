"""SRRL: feature matching plus softmax regression through a frozen copy of the teacher's head, by hand;
the distiller hands the head over; teachers without a head and mis-shaped points are refused."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from kdray.algorithms import create_method
from kdray.algorithms.distiller import teacher_module
from tests.method_harness import make_pair
from tests.test_feature_methods import batch_of, close, outputs, pin_identity

pytestmark = pytest.mark.usefixtures("one_thread")


def teacher_net(w, b):
    net = nn.Sequential(nn.Identity(), nn.Linear(len(w[0]), len(w)))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor(w))
        net[1].bias.copy_(torch.tensor(b))
    return net


def built(s, t, net, **params):
    term = create_method("srrl", **params)
    term.student_points, term.teacher_points = ["s0"], ["t0"]
    s_out, t_out = outputs(term, [s], [t])
    t_out.logits = torch.zeros(s.shape[0], net[1].out_features)
    term.bind_teacher_model(net)
    with torch.no_grad():
        term.build(s_out, t_out, 10)
    pin_identity(term.connector)
    return term, s_out, t_out


def logits(w, b, x):
    return [sum(w[k][d] * x[d] for d in range(len(x))) + b[k] for k in range(len(w))]


@pytest.mark.parametrize("sr_loss", ["ce", "mse"])
def test_srrl_value_identity_connector(sr_loss):
    torch.manual_seed(0)
    s, t = torch.rand(3, 2), torch.randn(3, 2)  # non-negative student: the connector's ReLU passes it
    w, b = [[1.0, -2.0], [0.5, 0.25], [-1.0, 3.0]], [0.1, 0.0, -0.2]
    term, s_out, t_out = built(s, t, teacher_net(w, b), feature_weight=2.0, sr_weight=3.0, sr_loss=sr_loss)
    out = term(s_out, t_out, batch_of(3))
    fm = sum((s[n, d] - t[n, d]).item() ** 2 for n in range(3) for d in range(2)) / 6
    sr = 0.0
    for n in range(3):
        zs, zt = logits(w, b, s[n].tolist()), logits(w, b, t[n].tolist())
        if sr_loss == "ce":
            ls = math.log(sum(math.exp(z) for z in zs))
            lt = math.log(sum(math.exp(z) for z in zt))
            sr += -sum(math.exp(zt[k] - lt) * (zs[k] - ls) for k in range(3)) / 3
        else:
            sr += sum((zs[k] - zt[k]) ** 2 for k in range(3)) / 9
    assert close(out["srrl_fm"], 2.0 * fm) and close(out["srrl_sr"], 3.0 * sr)


def test_distiller_hands_over_a_frozen_copy_of_the_teachers_head():
    assert create_method("srrl").sr_loss == "mse"
    distiller, teacher, batch = make_pair("srrl")
    term = distiller.terms[0]
    assert term.head is not teacher.model.fc
    assert torch.equal(term.head.weight, teacher.model.fc.weight)
    assert all(not p.requires_grad for p in term.head.parameters())
    distiller.train()
    assert not term.head.training
    assert teacher_module(teacher) is teacher.model and teacher_module(None) is None


def test_srrl_refuses_no_head_and_bad_shapes():
    term = create_method("srrl")
    with pytest.raises(ValueError, match="known only by its outputs"):
        term.bind_teacher_model(None)
    with pytest.raises(ValueError, match="teacher_head='nope'"):
        create_method("srrl", teacher_head="nope").bind_teacher_model(teacher_net([[1.0]], [0.0]))
    term.student_points, term.teacher_points = ["s0"], ["t0"]
    s_out, t_out = outputs(term, [torch.randn(2, 3)], [torch.randn(2, 5)])
    with pytest.raises(ValueError, match="no teacher head"):
        term.build(s_out, t_out, 10)
    with pytest.raises(ValueError) as err:
        built(torch.randn(2, 3), torch.randn(2, 5), teacher_net([[1.0, 2.0]], [0.0]))
    assert "(2, 3)" in str(err.value) and "(2, 5)" in str(err.value)
