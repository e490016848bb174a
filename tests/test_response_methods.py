"""Response-based terms (DKD, LSKD, TfKD): hand-derived values, their defining properties, gradients, training."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdray.algorithms import create_method, get_method, list_methods
from kdray.algorithms.base import Batch, ModelOutput
from kdray.algorithms.distiller import Distiller
from kdray.models import create_model

METHODS = ["dkd", "lskd", "tfkd"]  # these are registered with their metadata (every method is trained in test_every_method.py)


def _softmax(xs, t=1.0):
    e = [math.exp(x / t) for x in xs]
    return [v / sum(e) for v in e]


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def _batch(targets):
    y = torch.tensor(targets)
    return Batch(torch.zeros(len(targets), 1), y, torch.arange(len(targets)))


S = [[2.0, 0.5, -1.0, 0.0], [0.3, 1.2, 0.1, -0.4]]
T = [[3.0, 1.0, -2.0, 0.5], [-0.5, 2.5, 0.0, 1.0]]
Y = [0, 1]


# ----------------------------------------------------------------------------------------- registry
def test_methods_registered_with_metadata():
    methods = list_methods()
    for name in METHODS:
        cls = methods[name]
        assert cls.name == name and cls.kind == "response" and cls.paper
        assert cls.default_student_points is None and cls.default_teacher_points is None
    assert get_method("tfkd").provides_ce and not get_method("dkd").provides_ce and not get_method("lskd").provides_ce
    assert create_method("dkd").weight == 1.0 and create_method("dkd").beta == 8.0
    assert create_method("lskd").weight == 9.0 and create_method("lskd").temperature == 2.0


# --------------------------------------------------------------------------------------------- DKD
def test_dkd_value_by_hand():
    temp, alpha, beta, warmup = 2.0, 1.5, 8.0, 4
    term = create_method("dkd", alpha=alpha, beta=beta, temperature=temp, warmup=warmup)
    term.set_epoch(1)  # second epoch -> ramp (1 + 1) / 4
    out = term(ModelOutput(torch.tensor(S)), ModelOutput(torch.tensor(T)), _batch(Y))

    tckd = nckd = 0.0
    for s, t, y in zip(S, T, Y):
        ps, pt = _softmax(s, temp), _softmax(t, temp)
        tckd += _kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
        qs = [p / (1 - ps[y]) for i, p in enumerate(ps) if i != y]
        qt = [p / (1 - pt[y]) for i, p in enumerate(pt) if i != y]
        nckd += _kl(qt, qs)
    ramp = 0.5
    assert out["dkd_tckd"].item() == pytest.approx(ramp * temp**2 * alpha * tckd / 2, rel=1e-5)
    assert out["dkd_nckd"].item() == pytest.approx(ramp * temp**2 * beta * nckd / 2, rel=1e-5)


def test_dkd_decomposition_reproduces_kd():
    """The paper's identity: KD = TCKD + (1 - p_t^teacher) * NCKD, per sample."""
    temp = 3.0
    for s, t, y in zip(S, T, Y):
        term = create_method("dkd", alpha=1.0, beta=1.0, temperature=temp, warmup=0)
        out = term(ModelOutput(torch.tensor([s])), ModelOutput(torch.tensor([t])), _batch([y]))
        pt = _softmax(t, temp)
        kd = temp**2 * _kl(pt, _softmax(s, temp))
        assert out["dkd_tckd"].item() + (1 - pt[y]) * out["dkd_nckd"].item() == pytest.approx(kd, rel=1e-5)


def test_dkd_warmup_ramps_linearly():
    term = create_method("dkd", warmup=5)
    s, t = ModelOutput(torch.tensor(S)), ModelOutput(torch.tensor(T))
    term.set_epoch(10)
    full = {k: v.item() for k, v in term(s, t, _batch(Y)).items()}
    for epoch in range(8):
        term.set_epoch(epoch)
        out = term(s, t, _batch(Y))
        for key in full:
            assert out[key].item() == pytest.approx(min((epoch + 1) / 5, 1.0) * full[key], rel=1e-6)
    no_ramp = create_method("dkd", warmup=0)
    assert no_ramp(s, t, _batch(Y))["dkd_nckd"].item() == pytest.approx(full["dkd_nckd"], rel=1e-6)


def test_dkd_zero_when_student_equals_teacher():
    logits = torch.tensor(T)
    out = create_method("dkd", warmup=0)(ModelOutput(logits.clone()), ModelOutput(logits), _batch(Y))
    assert abs(out["dkd_tckd"].item()) < 1e-6 and abs(out["dkd_nckd"].item()) < 1e-6


def test_dkd_finite_for_extreme_logits():
    s = torch.tensor([[200.0, -300.0, 0.0], [-50.0, 80.0, 1000.0]], requires_grad=True)
    t = torch.tensor([[-100.0, 40.0, 0.0], [10.0, -90.0, 5.0]])
    out = create_method("dkd", warmup=0)(ModelOutput(s), ModelOutput(t), _batch([0, 2]))
    total = sum(out.values())
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(s.grad).all()


# -------------------------------------------------------------------------------------------- LSKD
def test_lskd_value_by_hand():
    tau, weight = 2.0, 9.0
    out = create_method("lskd")(ModelOutput(torch.tensor(S)), ModelOutput(torch.tensor(T)), _batch(Y))

    def z(row):
        mean = sum(row) / len(row)
        std = math.sqrt(sum((v - mean) ** 2 for v in row) / len(row))  # population std (1/K)
        return [(v - mean) / std for v in row]

    kl = sum(_kl(_softmax(z(t), tau), _softmax(z(s), tau)) for s, t in zip(S, T)) / 2
    assert out["lskd"].item() == pytest.approx(weight * tau**2 * kl, rel=1e-5)


def test_lskd_invariant_to_shift_and_scale_of_logits():
    torch.manual_seed(0)
    s, t = torch.randn(5, 7), torch.randn(5, 7) * 4
    term = create_method("lskd")
    base = term(ModelOutput(s), ModelOutput(t), _batch([0] * 5))["lskd"]
    scale = torch.tensor([[0.1], [3.0], [17.0], [1.0], [0.5]])  # per-sample positive scales
    shift = torch.tensor([[5.0], [-2.0], [100.0], [0.0], [-40.0]])
    for s2 in (s + 3.0, s * 10.0, scale * s + shift):
        moved = term(ModelOutput(s2), ModelOutput(t), _batch([0] * 5))["lskd"]
        assert moved.item() == pytest.approx(base.item(), rel=1e-4)
    assert term(ModelOutput(s), ModelOutput(2 * t - 1), _batch([0] * 5))["lskd"].item() == \
        pytest.approx(base.item(), rel=1e-4)
    # ... whereas plain KD at the same temperature is not.
    kd = F.kl_div(F.log_softmax(s / 2, 1), F.log_softmax(t / 2, 1), reduction="batchmean", log_target=True)
    kd10 = F.kl_div(F.log_softmax(10 * s / 2, 1), F.log_softmax(t / 2, 1), reduction="batchmean", log_target=True)
    assert abs(kd.item() - kd10.item()) > 1e-2


# -------------------------------------------------------------------------------------------- TfKD
def test_tfkd_value_by_hand():
    alpha, tau, a, weight = 0.3, 5.0, 0.9, 2.0
    term = create_method("tfkd", weight=weight, alpha=alpha, temperature=tau, correct_prob=a)
    out = term(ModelOutput(torch.tensor(S)), ModelOutput(torch.tensor(T)), _batch(Y))
    k = 4
    ce = kl = 0.0
    for s, y in zip(S, Y):
        ce += -math.log(_softmax(s)[y])
        pd = [a if i == y else (1 - a) / (k - 1) for i in range(k)]
        pd_tau = _softmax([math.log(p) for p in pd], tau)  # teacher softened: p^d ** (1/tau), renormalised
        root_a, root_other = a ** (1 / tau), ((1 - a) / (k - 1)) ** (1 / tau)
        assert pd_tau[y] == pytest.approx(root_a / (root_a + (k - 1) * root_other))
        kl += _kl(pd_tau, _softmax(s, tau))
    assert out["ce"].item() == pytest.approx((1 - alpha) * ce / 2, rel=1e-5)
    assert out["tfkd"].item() == pytest.approx(alpha * weight * tau**2 * kl / 2, rel=1e-5)


def test_tfkd_needs_no_teacher():
    s = torch.tensor(S)
    term = create_method("tfkd")
    ref = term(ModelOutput(s), ModelOutput(torch.tensor(T)), _batch(Y))
    for placeholder in (ModelOutput(torch.full((2, 4), float("nan"))), ModelOutput(torch.empty(0))):
        out = term(ModelOutput(s), placeholder, _batch(Y))
        assert all(torch.equal(out[k], ref[k]) for k in ref)
    # Inside a distiller, with the student's own logits standing in for the teacher's: CE comes only from it.
    distiller = Distiller(create_model("digits_mlp", 10), [create_method("tfkd")])
    batch = Batch(torch.rand(4, 1, 8, 8), torch.tensor([1, 2, 3, 4]), torch.arange(4))
    _, losses = distiller(batch, ModelOutput(torch.zeros(0)))
    assert set(losses) == {"ce", "tfkd"} and all(torch.isfinite(v) for v in losses.values())


def test_tfkd_minimised_by_the_virtual_teacher():
    a, y = 0.9, [2, 0]
    log_pd = torch.full((2, 5), math.log((1 - a) / 4))
    log_pd[0, 2] = log_pd[1, 0] = math.log(a)
    out = create_method("tfkd", correct_prob=a)(ModelOutput(log_pd + 3.0), ModelOutput(torch.empty(0)), _batch(y))
    assert abs(out["tfkd"].item()) < 1e-6


