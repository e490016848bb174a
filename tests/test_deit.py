"""DeiT (Touvron et al. 2021): the deit_vit student's two heads and the deit term, by hand and on digits."""
import math

import pytest
import torch

import kdray
from kdray.algorithms import create_method
from kdray.algorithms.base import Batch, ModelOutput
from kdray.algorithms.distiller import Distiller, Teacher, select_points
from kdray.models import create_model
from jobs import digits_job

pytestmark = pytest.mark.usefixtures("one_thread")

CLS = [[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]]
DIST = [[0.0, 1.0, 0.0], [1.0, 0.0, 2.0]]
TEACHER = [[0.0, 3.0, 1.0], [0.0, 0.0, 4.0]]  # argmax: 1, 2
Y = [0, 1]


def _log_softmax(row, t=1.0):
    lse = math.log(sum(math.exp(v / t) for v in row))
    return [v / t - lse for v in row]


def _term(**params):
    term = create_method("deit", **params)
    term.student_points = ["head_dist"]
    out = ModelOutput(torch.tensor(CLS), {"head_dist": torch.tensor(DIST)})
    batch = Batch(torch.zeros(2, 1), torch.tensor(Y), torch.arange(2))
    return term(out, ModelOutput(torch.tensor(TEACHER)), batch)


def test_hard_variant_by_hand():
    ce = -(_log_softmax(CLS[0])[0] + _log_softmax(CLS[1])[1]) / 2
    hard = -(_log_softmax(DIST[0])[1] + _log_softmax(DIST[1])[2]) / 2
    losses = _term()
    assert losses["ce"].item() == pytest.approx(0.5 * ce, abs=1e-6)
    assert losses["deit"].item() == pytest.approx(0.5 * hard, abs=1e-6)


def test_soft_variant_by_hand():
    t = 2.0
    kl = 0.0
    for s_row, t_row in zip(DIST, TEACHER):
        log_s, log_t = _log_softmax(s_row, t), _log_softmax(t_row, t)
        kl += sum(math.exp(lt) * (lt - ls) for lt, ls in zip(log_t, log_s))
    losses = _term(variant="soft", alpha=0.3, temperature=t)
    ce = -(_log_softmax(CLS[0])[0] + _log_softmax(CLS[1])[1]) / 2
    assert losses["deit"].item() == pytest.approx(0.3 * t * t * kl / 2, abs=1e-6)
    assert losses["ce"].item() == pytest.approx(0.7 * ce, abs=1e-6)


def test_bad_parameters_are_one_line_errors():
    with pytest.raises(ValueError, match="deit.variant must be one of hard, soft"):
        create_method("deit", variant="medium")
    with pytest.raises(ValueError, match=r"deit.alpha must be in \[0, 1\]"):
        create_method("deit", alpha=1.5)
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        create_model("deit_vit", 10, patch_size=3)


def test_eval_logits_average_the_two_heads_softmax():
    torch.manual_seed(0)
    model = create_model("deit_vit", 10).eval()
    x = torch.randn(4, 1, 8, 8)
    cls, dist = model.heads(x)
    assert not torch.allclose(cls, dist)
    expected = (cls.softmax(1) + dist.softmax(1)) / 2
    torch.testing.assert_close(model(x).exp(), expected, atol=1e-6, rtol=1e-5)
    model.inference = "dist"
    torch.testing.assert_close(model(x), dist)
    assert torch.equal(model.train()(x), cls)  # training: the class head (the labels' CE trains it)


def test_each_head_gets_its_own_gradient_and_the_teacher_none():
    torch.manual_seed(0)
    student = create_model("deit_vit", 10)
    teacher_model = create_model("digits_cnn", 10, width=8)
    distiller = Distiller(student, [create_method("deit", student_points=["head_dist"])])
    teacher = Teacher(teacher_model, distiller.resolve_teacher_points(teacher_model))
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    distiller.build(x, teacher)
    distiller.train()
    term = distiller.terms[0]
    s_out = distiller.student_forward(x)
    losses = term(select_points(s_out, term.student_points), teacher(x), Batch(x, y, torch.arange(8)))
    losses["deit"].backward(retain_graph=True)
    assert student.head.weight.grad is None  # (the class token does get some: the tokens attend to each other)
    assert student.head_dist.weight.grad.abs().sum() > 0 and student.dist_token.grad.abs().sum() > 0
    student.zero_grad(set_to_none=True)
    losses["ce"].backward()
    assert student.head_dist.weight.grad is None and student.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.slow  # ~25 s: a transformer needs the full digits split to learn in a few epochs
def test_short_digits_training_of_the_distillation_token(tmp_path):
    seen = []

    class Record:
        def on_epoch_end(self, epoch, metrics, loop):
            if metrics.get("kind") == "distill":
                seen.append(metrics["train_loss"])

    cfg = digits_job(tmp_path, data__options__train_fraction=1.0, teacher__train__epochs=2,
                     student={"model": "deit_vit"},
                     methods=[{"name": "deit", "variant": "hard", "student_points": ["head_dist"]}],
                     train__epochs=5, train__optimizer="adamw", train__lr=5e-3, train__weight_decay=0.05)
    result = kdray.distill(cfg, callbacks=[Record()], quiet=True)
    assert result.accuracies("teacher")[0] > 0.9
    assert all(math.isfinite(v) for v in seen) and seen[-1] < 0.65 * seen[0], seen  # seen 2.34 -> 1.27
    assert result.accuracies("distill")[0] > 0.4, result.stages  # averaged heads; seen 0.574 (chance 0.1)
