"""Precision, dtype and memory format of a step: every registered term in fp32 under autocast, on float64 models,
and the TrainLoop's ``precision`` / ``channels_last`` / ``compile`` against its default step.

The per-method tests iterate the registry (``list_methods()``), so a new method is checked without editing this
file. Models are the harness's digits CNNs (``tests/method_harness.py``).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from kdray.algorithms import create_method, list_methods
from kdray.algorithms.base import ModelOutput
from kdray.algorithms.distiller import Distiller, Teacher, select_points
from kdray.algorithms.engine import TrainLoop, seed_everything
from kdray.algorithms.optim import make_optimizer, make_schedule
from kdray.algorithms.precision import PRECISIONS
from kdray.models import create_model
from tests.method_harness import make_pair

METHODS = sorted(name for name, cls in list_methods().items() if cls.modality != "text")  # image harness


pytestmark = pytest.mark.usefixtures("one_thread")


def _loss(method: str, precision: str, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """One training-mode forward of a fresh, seeded pair (so every call starts from the same weights, BN
    statistics and memory banks) under ``precision``; the teacher runs under the same autocast."""
    distiller, teacher, batch = make_pair(method, dtype=dtype)
    distiller.train()
    torch.manual_seed(1)  # CRD's negatives
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        t_out = teacher(batch.inputs)
        if precision == "bf16":  # autocast is really on: otherwise the comparison below proves nothing
            assert t_out.logits.dtype == torch.bfloat16
        _, losses = distiller(batch, t_out)
    return losses


def _bf16(out: ModelOutput) -> ModelOutput:
    return ModelOutput(out.logits.bfloat16(), {k: v.bfloat16() for k, v in out.features.items()})


def _upcast(out: ModelOutput) -> ModelOutput:
    up = ModelOutput(out.logits.float(), {k: v.float() for k, v in out.features.items()})
    if hasattr(out, "views"):
        up.views = _upcast(out.views)
    return up


def _with_views(out: ModelOutput, model, points, views) -> ModelOutput:
    """``out`` with ``model``'s bf16 outputs on a term's extra inputs attached (as the distiller does)."""
    if views is not None:
        out.views = _bf16(select_points(model(views), points))
    return out


@pytest.mark.parametrize("method", METHODS)
def test_term_computes_in_fp32_under_bf16_autocast(method):
    """Given bf16 inputs under bf16 autocast (what a term sees in a bf16 step), the term returns fp32 losses
    equal to the term run eagerly in fp32 on the same values upcast: its softmax / KL / log-sum-exp, relation
    matrices and connectors ran in fp32. Without the upcast in ``KnowledgeTerm.__call__`` the dtypes are bf16
    and DKD / PKT / IRG / RKD / TfKD differ by 20% to 3600% (measured), far outside the 1e-5 allowed here
    (the same fp32 arithmetic on the same numbers: only summation order may differ)."""
    results = []
    for under_autocast in (True, False):
        distiller, teacher, batch = make_pair(method)
        term = distiller.terms[0]
        with torch.no_grad():
            torch.manual_seed(2)
            views = term.extra_inputs(batch)  # SSKD's rotations, soft randomisation's noisy copy
            s_out = _with_views(_bf16(select_points(distiller.student_forward(batch.inputs), term.student_points)),
                                distiller.student_forward, term.student_points, views)
            t_out = _with_views(_bf16(select_points(teacher(batch.inputs), term.teacher_points)), teacher,
                                term.teacher_points, views if term.teacher_sees_views else None)
        torch.manual_seed(1)
        if under_autocast:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                results.append(term(s_out, t_out, batch))
        else:
            results.append(term(_upcast(s_out), _upcast(t_out), batch))
    low, full = results
    assert low.keys() == full.keys()
    for key in full:
        assert low[key].dtype == torch.float32, f"{method}.{key} came out in {low[key].dtype}"
        torch.testing.assert_close(low[key], full[key], rtol=1e-5, atol=1e-6, msg=f"{method}.{key}")


@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_loss_is_close_to_fp32(method):
    """The whole step (teacher and student under bf16 autocast, terms in fp32) gives every named loss within
    ``5% + 1e-4`` of the fp32 step on the same inputs and weights, finite and in fp32.

    Tolerance: bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2% per value); the two conv stages of
    the digits CNNs compound it to about 0.5-1% on logits and features, and terms that compare student with
    teacher quantities (differences, ratios, normalised distances) amplify it a few times: the largest measured
    gap is 1.5% (DKD's target-class term, a value of ~1e-3). 5% leaves 3x headroom; with the terms' arithmetic in
    bf16 the gaps were 20% (TfKD) to 3600% (PKT)."""
    full = {k: v.detach() for k, v in _loss(method, "fp32").items()}
    low = {k: v.detach() for k, v in _loss(method, "bf16").items()}
    assert low.keys() == full.keys()
    for key in full:
        assert low[key].dtype == torch.float32, f"{method}.{key} came out in {low[key].dtype}"
        assert torch.isfinite(low[key]), f"{method}.{key} = {float(low[key])} under bf16"
        gap, allowed = abs(float(low[key]) - float(full[key])), 0.05 * abs(float(full[key])) + 1e-4
        assert gap <= allowed, f"{method}.{key}: bf16 {float(low[key]):.6g} vs fp32 {float(full[key]):.6g}"


@pytest.mark.parametrize("method", METHODS)
def test_float64_models_build_connectors_and_train(method):
    """On float64 models and inputs every term builds its connectors / memory banks in float64 (they follow the
    features' dtype, not only their device), returns finite float64 losses, and backward reaches the student
    (or, in a pre-training phase, the connectors) in float64. CRD and FSP built theirs with ``.to(device)`` only and failed here with a dtype mismatch."""
    distiller, teacher, batch = make_pair(method, dtype=torch.float64)
    for name, p in list(distiller.named_parameters()) + list(distiller.named_buffers()):
        if p.is_floating_point():
            assert p.dtype == torch.float64, f"{method}: {name} is {p.dtype}"
    distiller.train()
    _, losses = distiller(batch, teacher(batch.inputs))
    for key, value in losses.items():
        assert value.dtype == torch.float64, f"{method}.{key} came out in {value.dtype}"
        assert torch.isfinite(value), f"{method}.{key} = {float(value.detach())}"
    sum(losses.values()).backward()
    grads = [p.grad for p in distiller.parameters() if p.grad is not None]  # student or (FT's first phase) connectors
    assert grads and all(g.dtype == torch.float64 for g in grads)


# --- the training loop -----------------------------------------------------------------------------------
def _tiny_loop(method: str = "fitnet", seed: int = 0, **hardware) -> TrainLoop:
    """A KD stage on CIFAR-shaped random data (3 x 16 x 16, 10 classes): digits CNN 16 -> 8, two batches of 16."""
    seed_everything(seed)
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
    data = DataLoader(TensorDataset(x, y, torch.arange(32)), batch_size=16)
    student = create_model("digits_cnn", 10, width=8, in_channels=3)
    teacher_model = create_model("digits_cnn", 10, width=16, in_channels=3)
    distiller = Distiller(student, [create_method(method)])
    teacher = Teacher(teacher_model, distiller.resolve_teacher_points(teacher_model))
    distiller.build(x[:2], teacher, 32)
    opt = make_optimizer(distiller.parameters(), "sgd", 0.05)
    return TrainLoop(distiller, teacher, opt, make_schedule(opt, "constant", 1), data, data, 10, 1, "cpu",
                     **hardware)


def _weights(loop: TrainLoop) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in loop.distiller.state_dict().items()}


def test_config_precision_fields_default_to_fp32_and_match_the_loop():
    """``train.precision`` / ``channels_last`` / ``compile`` default to fp32 / false / false, the config accepts
    exactly the precisions the loop knows, and an unknown one fails naming the allowed values."""
    from kdray.config import OptimSpec

    spec = OptimSpec()
    assert (spec.precision, spec.channels_last, spec.compile) == ("fp32", False, False)
    assert OptimSpec.model_fields["precision"].annotation.__args__ == PRECISIONS
    with pytest.raises(ValueError, match="fp16"):
        OptimSpec(precision="fp8")
    with pytest.raises(ValueError, match="allowed: fp32, bf16, fp16"):
        TrainLoop(None, None, None, None, [], [], 10, 1, "cpu", precision="fp8")


def test_bf16_loop_trains_fp32_weights_close_to_fp32_loop():
    """A bf16 epoch keeps fp32 weights and connectors, logs losses within 5% of the fp32 epoch's (the
    tolerance reasoning of the per-term test), and moves the weights like the fp32 epoch does (relative
    difference of the updates below 10%: two SGD steps from bf16 gradients)."""
    full, low = _tiny_loop(), _tiny_loop(precision="bf16")
    start = _weights(full)
    m_full, m_low = full.train_epoch(0), low.train_epoch(0)
    for key in m_full:
        assert abs(m_low[key] - m_full[key]) <= 0.05 * abs(m_full[key]) + 1e-4, (key, m_low[key], m_full[key])
    w_full, w_low = _weights(full), _weights(low)
    for k, v in w_low.items():
        if v.is_floating_point():
            assert v.dtype == torch.float32, k
    step_full = torch.cat([(w_full[k] - start[k]).flatten() for k in start if start[k].is_floating_point()])
    step_low = torch.cat([(w_low[k] - start[k]).flatten() for k in start if start[k].is_floating_point()])
    assert step_full.norm() > 0
    assert (step_low - step_full).norm() / step_full.norm() < 0.1


def test_fp16_loop_scales_the_loss_and_checkpoints_the_scaler():
    """fp16 gets an enabled GradScaler for the CPU device type; its state is in the loop's checkpoint (loadable
    with ``weights_only=True``) and restored by ``load_state_dict``; fp32 and bf16 checkpoint none."""
    import io

    assert not _tiny_loop(precision="bf16").scaler.is_enabled()
    assert "grad_scaler" not in _tiny_loop().state_dict()
    loop = _tiny_loop(precision="fp16")
    assert loop.scaler.is_enabled()
    metrics = loop.train_epoch(0)
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    loop.scaler.update(1234.0)  # a distinctive scale, to see it come back
    buffer = io.BytesIO()
    torch.save(loop.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["grad_scaler"]["scale"] == 1234.0
    fresh = _tiny_loop(precision="fp16")
    fresh.load_state_dict(state)
    assert fresh.scaler.get_scale() == 1234.0


def test_channels_last_step_equals_the_default_step():
    """``channels_last=True`` converts the student, its connectors and the teacher (4-D weights really are
    channels_last afterwards) and gives the default epoch's losses within 1e-5 and weights within 5e-5 (the same
    maths; only the kernels' summation order differs, ~1e-7 relative per sum; two SGD steps of a FitNet loss of
    ~24 move weights by up to 0.8 and the measured gap was 7e-6)."""
    default, nhwc = _tiny_loop(), _tiny_loop(channels_last=True)
    four_d = [p for p in list(nhwc.distiller.parameters()) + list(nhwc.teacher.parameters()) if p.dim() == 4]
    assert four_d and all(p.is_contiguous(memory_format=torch.channels_last) for p in four_d)
    assert any(not p.is_contiguous() for p in four_d)  # not also NCHW-contiguous: the layout really changed
    m_default, m_nhwc = default.train_epoch(0), nhwc.train_epoch(0)
    for key in m_default:
        assert m_nhwc[key] == pytest.approx(m_default[key], rel=1e-5, abs=1e-6), key
    w_default, w_nhwc = _weights(default), _weights(nhwc)
    for k in w_default:
        torch.testing.assert_close(w_nhwc[k], w_default[k], rtol=1e-5, atol=5e-5, msg=k)


@pytest.mark.slow
def test_compiled_step_equals_the_eager_step():
    """``compile=True`` (student and teacher, in place) gives the eager epoch's losses and weights within 1e-4
    (inductor fuses and reorders fp32 sums), keeps the state-dict keys (no ``_orig_mod.``), and captures the
    feature points: first a hook-less KD student is compiled, then a FitNet student of the same architecture,
    whose taps dynamo would skip (reusing the first graph) without hook guards. Slow: 20-50 s of compilation on
    a 2-core CPU with a cold inductor cache."""
    for method in ("kd", "fitnet"):
        eager, compiled = _tiny_loop(method), _tiny_loop(method, compile=True)
        assert _weights(compiled).keys() == _weights(eager).keys()
        m_eager, m_compiled = eager.train_epoch(0), compiled.train_epoch(0)
        assert m_compiled.keys() == m_eager.keys()
        for key in m_eager:
            assert m_compiled[key] == pytest.approx(m_eager[key], rel=1e-4, abs=1e-5), (method, key)
        w_eager, w_compiled = _weights(eager), _weights(compiled)
        for k in w_eager:
            torch.testing.assert_close(w_compiled[k], w_eager[k], rtol=1e-4, atol=1e-5, msg=f"{method}: {k}")
