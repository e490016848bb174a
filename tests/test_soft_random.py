"""Soft randomisation (Arani et al. 2019): the student on seeded noisy inputs against the teacher on clean ones;
values by hand, what the distiller runs on what, a teacher cache allowed, shapes.

Gradient flow and the short digits training are checked for every registered method in test_every_method.py."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from kdray.algorithms import create_method, get_method
from kdray.algorithms.base import Batch, ModelOutput
from kdray.algorithms.distiller import Distiller, Teacher, check_view_teacher


def softmax(row, tau=1.0):
    e = [math.exp(v / tau) for v in row]
    return [v / sum(e) for v in e]


def test_registered_with_kd_libs_weights():
    cls = get_method("soft_random")
    assert cls.kind == "response" and "Noisy Collaboration" in cls.paper and cls.provides_ce
    assert not cls.teacher_sees_views
    term = create_method("soft_random")
    assert (term.alpha, term.temperature, term.sigma) == (0.5, 20.0, 0.3)


def test_loss_reads_the_noisy_student_and_the_clean_teacher_by_hand():
    term = create_method("soft_random", alpha=0.25, temperature=1.0)
    clean = ModelOutput(torch.tensor([[9.0, -9.0]], dtype=torch.float64))  # must not be used
    clean.views = ModelOutput(torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    teacher = ModelOutput(torch.tensor([[0.0, 1.0]], dtype=torch.float64))
    out = term(clean, teacher, Batch(torch.zeros(1, 2), torch.tensor([1]), torch.arange(1)))
    ps, pt = softmax([1.0, 0.0]), softmax([0.0, 1.0])
    assert out["ce"].item() == pytest.approx(0.75 * -math.log(ps[1]), rel=1e-9)
    kl = sum(pt[k] * math.log(pt[k] / ps[k]) for k in range(2))
    assert out["soft_random"].item() == pytest.approx(0.25 * kl, rel=1e-9)


def test_the_distiller_runs_only_the_student_on_the_seeded_noisy_copy():
    torch.manual_seed(0)
    student, teacher_net = nn.Linear(3, 2), nn.Linear(3, 2)
    seen = []
    teacher_net.register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    x = torch.randn(4, 3)
    distiller = Distiller(student, [create_method("soft_random", sigma=0.5, seed=7)])
    teacher = Teacher(teacher_net)
    distiller.build(x, teacher)
    seen.clear()
    batch = Batch(x, torch.tensor([0, 1, 0, 1]), torch.arange(4))
    logits, losses = distiller(batch, teacher(x))
    assert len(seen) == 1 and torch.equal(seen[0], x)  # the teacher saw the clean batch once, no views
    noisy = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    expected = create_method("soft_random", sigma=0.5)
    s_out = ModelOutput(student(x))
    s_out.views = ModelOutput(student(noisy))
    want = expected(s_out, ModelOutput(teacher_net(x).detach()), batch)
    assert set(losses) == {"ce", "soft_random"}  # the distiller's clean CE is replaced
    for key in want:
        assert losses[key].item() == pytest.approx(want[key].item(), rel=1e-6)


def test_a_teacher_cache_can_serve_it_and_sigma_zero_is_kd_on_clean_inputs():
    assert check_view_teacher([create_method("soft_random")], object()) == ()
    torch.manual_seed(1)
    student = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    t_logits = torch.randn(4, 2)
    distiller = Distiller(student, [create_method("soft_random", sigma=0.0)])
    distiller.build(x, None)
    _, losses = distiller(Batch(x, torch.tensor([0, 1, 1, 0]), torch.arange(4)), ModelOutput(t_logits))
    kd = create_method("kd", alpha=0.5, temperature=20.0)(ModelOutput(student(x)), ModelOutput(t_logits),
                                                           Batch(x, torch.tensor([0, 1, 1, 0]), torch.arange(4)))
    assert losses["ce"].item() == pytest.approx(kd["ce"].item(), rel=1e-6)
    assert losses["soft_random"].item() == pytest.approx(kd["kd"].item(), rel=1e-6)


def test_bad_input_is_one_line():
    term = create_method("soft_random")
    with pytest.raises(ValueError, match="floating-point"):
        term.extra_inputs(Batch(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                                torch.arange(2)))
    s = ModelOutput(torch.zeros(2, 3))
    s.views = ModelOutput(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        term(s, ModelOutput(torch.zeros(2, 4)), Batch(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long),
                                                      torch.arange(2)))
    with pytest.raises(ValueError, match="sigma"):
        create_method("soft_random", sigma=-1.0)
