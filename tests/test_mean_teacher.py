"""Mean teacher (Tarvainen & Valpola 2017): the consistency and the EMA update by hand, the ramp-up, gradients to
the student only, the loop's post-step update, and the EMA copy kept across a checkpoint and resume.

Gradient flow and the short digits training are checked for every registered method in test_every_method.py."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from kdray.algorithms import create_method, get_method
from kdray.algorithms.base import Batch, ModelOutput
from kdray.algorithms.distiller import Distiller
from kdray.algorithms.engine import TrainLoop, seed_everything
from kdray.algorithms.optim import make_optimizer, make_schedule
from kdray.algorithms.response.mean_teacher import sigmoid_rampup
from kdray.data import build_datasets
from kdray.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")

W0 = [[1.0, -1.0], [0.5, 0.0], [0.0, 2.0]]
W1 = [[0.0, 1.0], [1.5, -1.0], [1.0, 0.0]]
X = [[1.0, 2.0], [-1.0, 0.5]]


def linear(w) -> nn.Linear:
    net = nn.Linear(2, 3, bias=False).double()
    with torch.no_grad():
        net.weight.copy_(torch.tensor(w, dtype=torch.float64))
    return net


def _softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def _logits(w, x):
    return [sum(w[k][d] * x[d] for d in range(2)) for k in range(3)]


def bound(student, **params):
    term = create_method("mean_teacher", noise_std=0.0, rampup_epochs=0, **params)
    term.bind_student_model(student)
    return term


def test_registered_without_teacher_with_paper_defaults():
    cls = get_method("mean_teacher")
    assert cls.kind == "response" and "Mean teachers" in cls.paper and not cls.needs_teacher and not cls.provides_ce
    term = create_method("mean_teacher")
    assert (term.consistency, term.ema_decay, term.rampup_decay, term.rampup_epochs, term.noise_std) == \
        (100.0, 0.999, 0.99, 5, 0.15)


def test_consistency_by_hand_against_the_ema_copy():
    student = linear(W0)
    term = bound(student, consistency=2.0)
    with torch.no_grad():
        student.weight.copy_(torch.tensor(W1, dtype=torch.float64))  # the student moved; the copy did not
    x = torch.tensor(X, dtype=torch.float64)
    out = term(ModelOutput(student(x)), ModelOutput(student(x)), Batch(x, torch.zeros(2, dtype=torch.long),
                                                                       torch.arange(2)))
    mse = sum((a - b) ** 2 for n in range(2)
              for a, b in zip(_softmax(_logits(W1, X[n])), _softmax(_logits(W0, X[n])))) / 6
    assert set(out) == {"mean_teacher"} and out["mean_teacher"].item() == pytest.approx(2.0 * mse, rel=1e-9)


def test_ema_update_by_hand_true_average_then_decay():
    student = linear(W0)
    term = bound(student, ema_decay=0.6)
    with torch.no_grad():
        student.weight.copy_(torch.tensor(W1, dtype=torch.float64))
    term.after_step()  # update 1: a = min(1 - 1/2, 0.6) = 0.5
    half = [[(a + b) / 2 for a, b in zip(r0, r1)] for r0, r1 in zip(W0, W1)]
    assert torch.allclose(term.ema.weight, torch.tensor(half, dtype=torch.float64)) and int(term.steps) == 1
    term.after_step()  # update 2: a = min(1 - 1/3, 0.6) = 0.6, towards W1 again
    two = [[0.6 * h + 0.4 * b for h, b in zip(rh, r1)] for rh, r1 in zip(half, W1)]
    assert torch.allclose(term.ema.weight, torch.tensor(two, dtype=torch.float64))
    assert torch.equal(student.weight, torch.tensor(W1, dtype=torch.float64))  # the student is only read


def test_rampup_of_weight_and_decay():
    assert sigmoid_rampup(0, 4) == pytest.approx(math.exp(-5)) and sigmoid_rampup(2, 4) == pytest.approx(
        math.exp(-1.25)) and sigmoid_rampup(9, 4) == 1.0 and sigmoid_rampup(3, 0) == 1.0
    term = create_method("mean_teacher", rampup_epochs=4, consistency=10.0)
    term.bind_student_model(linear(W0))
    term.steps.fill_(1000)
    term.set_epoch(2)
    assert term.weight() == pytest.approx(10 * math.exp(-1.25)) and term.decay() == 0.99  # ramp-up phase
    term.set_epoch(4)
    assert term.weight() == 10.0 and term.decay() == 0.999


def test_gradients_reach_the_student_never_the_copy_and_bad_shapes_refused():
    student = linear(W0)
    term = bound(student)
    assert all(not p.requires_grad for p in term.ema.parameters())
    with torch.no_grad():
        student.weight.add_(0.3)
    x = torch.tensor(X, dtype=torch.float64)
    batch = Batch(x, torch.zeros(2, dtype=torch.long), torch.arange(2))
    term(ModelOutput(student(x)), ModelOutput(student(x)), batch)["mean_teacher"].backward()
    assert student.weight.grad.abs().sum() > 0 and all(p.grad is None for p in term.ema.parameters())
    with pytest.raises(ValueError, match=r"student logits \(2, 4\) and EMA logits \(2, 3\)"):
        term(ModelOutput(torch.zeros(2, 4, dtype=torch.float64)), ModelOutput(torch.zeros(2, 4)), batch)
    with pytest.raises(ValueError, match="binds the student"):
        create_method("mean_teacher")(ModelOutput(torch.zeros(2, 3)), ModelOutput(torch.zeros(2, 3)), batch)
    with pytest.raises(ValueError, match="ema_decay"):
        create_method("mean_teacher", ema_decay=1.0)


def _loop(epochs: int):
    seed_everything(0)
    splits = build_datasets("digits", train_fraction=0.1)
    loader = DataLoader(splits.train, batch_size=32, shuffle=False)
    distiller = Distiller(create_model("digits_cnn", 10, width=4), [create_method("mean_teacher")])
    distiller.build(next(iter(loader))[0], None, len(splits.train))
    opt = make_optimizer([p for p in distiller.parameters() if p.requires_grad], "sgd", 0.05)
    return TrainLoop(distiller, None, opt, make_schedule(opt, "constant", epochs), loader,
                     DataLoader(splits.val, 256), 10, epochs, "cpu"), len(loader)


def test_loop_updates_the_copy_after_each_step_and_a_resume_keeps_it():
    full, steps_per_epoch = _loop(2)
    term = full.distiller.terms[0]
    start = [p.clone() for p in term.ema.parameters()]
    full.run()
    assert int(term.steps) == 2 * steps_per_epoch  # one update per optimizer step
    student = dict(full.distiller.student.named_parameters())
    for (name, avg), first in zip(term.ema.named_parameters(), start):
        assert not torch.equal(avg, first) and not torch.equal(avg, student[name])  # moved, but lags the student

    half, _ = _loop(2)
    half.epochs = 1
    half.run()
    state = half.state_dict()
    assert any(k.startswith("distiller.terms.0.ema.") or k.startswith("terms.0.ema.") for k in state["distiller"])
    resumed, _ = _loop(2)
    resumed.load_state_dict(state)
    assert int(resumed.distiller.terms[0].steps) == steps_per_epoch
    resumed.run()
    for a, b in zip(resumed.distiller.terms[0].ema.state_dict().values(), term.ema.state_dict().values()):
        assert torch.equal(a, b)  # the same average as the uninterrupted run
