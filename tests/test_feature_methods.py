"""Feature-based methods: values from the papers' formulas by hand, gradient flow, short trainings, shapes.

Expected values are written out here with explicit loops / elementary ops (never the modules' own
helpers); learnable connectors are pinned to identities so the value is computable by hand.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from kdray.algorithms import create_method, list_methods
from kdray.algorithms.base import Batch, ModelOutput
from tests.method_harness import short_training

pytestmark = pytest.mark.usefixtures("one_thread")


FEATURE_METHODS = ["fitnet", "at", "nst", "pkt", "ft", "ab", "vid", "ofd", "reviewkd"]  # trained in test_every_method.py


# --- helpers ----------------------------------------------------------------------------------
def make_term(name: str, s_feats, t_feats, **params):
    """A built term whose points are ``s0, s1, ...`` / ``t0, t1, ...`` holding the given tensors."""
    term = create_method(name, **params)
    term.student_points = [f"s{i}" for i in range(len(s_feats))]
    term.teacher_points = [f"t{i}" for i in range(len(t_feats))]
    s_out, t_out = outputs(term, s_feats, t_feats)
    with torch.no_grad():
        term.build(s_out, t_out, 100)
    return term, s_out, t_out


def outputs(term, s_feats, t_feats):
    b = s_feats[0].shape[0]
    s_out = ModelOutput(torch.zeros(b, 10), dict(zip(term.student_points, s_feats)))
    t_out = ModelOutput(torch.zeros(b, 10), dict(zip(term.teacher_points, t_feats)))
    return s_out, t_out


def batch_of(n: int) -> Batch:
    return Batch(torch.zeros(n, 1), torch.zeros(n, dtype=torch.long), torch.arange(n))


def run(term, s_out, t_out) -> dict[str, torch.Tensor]:
    return term(s_out, t_out, batch_of(s_out.logits.shape[0]))


def pin_identity(module: nn.Module) -> None:
    """Convs -> identity on the leading channels (centre tap), biases 0; BN -> exact identity in eval."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                m.weight.zero_()
                kh, kw = m.weight.shape[-2:]
                for o in range(min(m.weight.shape[0], m.weight.shape[1])):
                    m.weight[o, o, kh // 2, kw // 2] = 1.0
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
                m.weight.data.fill_(1.0)
                m.bias.data.zero_()
                m.eps = 0.0
    module.eval()


def block_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    """Average ``k x k`` blocks by hand (what adaptive pooling by an integer factor computes)."""
    b, c, h, w = x.shape
    out = torch.zeros(b, c, h // k, w // k)
    for i in range(h // k):
        for j in range(w // k):
            out[:, :, i, j] = x[:, :, i * k:(i + 1) * k, j * k:(j + 1) * k].mean(dim=(2, 3))
    return out


def close(a, b, tol=1e-5):
    a = float(a.detach()) if isinstance(a, torch.Tensor) else float(a)
    b = float(b.detach()) if isinstance(b, torch.Tensor) else float(b)
    return abs(a - b) <= tol * max(1.0, abs(b))


def test_feature_methods_registered():
    methods = list_methods()
    for name in FEATURE_METHODS:
        cls = methods[name]
        assert cls.name == name and cls.kind == "feature" and cls.paper
        assert "weight" in cls.__init__.__code__.co_varnames


# --- FitNet -------------------------------------------------------------------------------------
def test_fitnet_value_identity_regressor():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)  # t has negatives: no ReLU in the regressor
    term, s_out, t_out = make_term("fitnet", [s], [t])
    pin_identity(term.regressor)
    expected = 100.0 * sum(((s[b, c, i, j] - t[b, c, i, j]) ** 2).item()
                           for b in range(2) for c in range(3) for i in range(4) for j in range(4)) / (2 * 3 * 16)
    assert close(run(term, s_out, t_out)["fitnet"], expected)


def test_fitnet_regressor_kernel_shrinks_larger_guided_map_and_uses_hint_relu():
    torch.manual_seed(1)
    s, t = torch.randn(2, 2, 4, 4), torch.rand(2, 2, 2, 2)  # non-negative hint: ReLU in the regressor
    term, s_out, t_out = make_term("fitnet", [s], [t], weight=1.0)
    conv = term.regressor[0]
    assert tuple(conv.kernel_size) == (3, 3)  # 4 - 2 + 1, the paper's regressor
    assert isinstance(term.regressor[-1], nn.ReLU)
    pin_identity(term.regressor)
    with torch.no_grad():
        conv.weight.zero_()
        for c in range(2):
            conv.weight[c, c] = 1.0 / 9.0  # 3x3 window mean
    expected = 0.0
    for b in range(2):
        for c in range(2):
            for i in range(2):
                for j in range(2):
                    r = max(s[b, c, i:i + 3, j:j + 3].mean().item(), 0.0)
                    expected += (r - t[b, c, i, j].item()) ** 2
    expected /= 2 * 2 * 2 * 2
    assert close(run(term, s_out, t_out)["fitnet"], expected)


def test_fitnet_smaller_guided_map_upsamples_by_integer_factors_else_raises():
    for k in (2, 3):
        s, t = torch.randn(2, 3, 2, 2), torch.randn(2, 5, 2 * k, 2 * k)
        term, s_out, t_out = make_term("fitnet", [s], [t])
        assert isinstance(term.regressor[0], nn.ConvTranspose2d)
        assert term.regressor(s).shape == t.shape
        assert torch.isfinite(run(term, s_out, t_out)["fitnet"])
    with pytest.raises(ValueError) as err:
        make_term("fitnet", [torch.randn(2, 3, 2, 2)], [torch.randn(2, 5, 3, 3)])
    msg = str(err.value)
    assert "(2, 3, 2, 2)" in msg and "(2, 5, 3, 3)" in msg and "'s0'" in msg and "'t0'" in msg


def test_fitnet_picks_the_middle_stage_and_hint_pretraining_phase():
    feats = [torch.randn(2, 2, 4, 4) for _ in range(3)]
    term, _, _ = make_term("fitnet", feats, feats)
    assert term.hint_paths() == ("s1", "t1")
    term, s_out, t_out = make_term("fitnet", feats, feats, hint_epochs=2, keep_hint=False)
    term.set_epoch(0)
    assert not term.uses_hard_labels() and "fitnet" in run(term, s_out, t_out)
    term.set_epoch(2)
    assert term.uses_hard_labels() and run(term, s_out, t_out) == {}


# --- AT -----------------------------------------------------------------------------------------
def test_at_value_small_numbers():
    # one sample, attention maps q_s = [1, 0], q_t = [0, 1] -> ||q_s - q_t|| = sqrt(2), H*W = 2
    s = torch.tensor([[[[1.0, 0.0]]]])
    t = torch.tensor([[[[0.0, 1.0]]]])
    term, s_out, t_out = make_term("at", [s], [t])
    assert close(run(term, s_out, t_out)["at"], 1000 / 2 * math.sqrt(2) / 2)


def _at_by_hand(s_list, t_list, beta=1000.0):
    total = 0.0
    for s, t in zip(s_list, t_list):
        b, _, h, w = s.shape
        for n in range(b):
            qs = (s[n] ** 2).sum(dim=0).flatten()
            qt = (t[n] ** 2).sum(dim=0).flatten()
            qs, qt = qs / math.sqrt((qs ** 2).sum()), qt / math.sqrt((qt ** 2).sum())
            total += math.sqrt(((qs - qt) ** 2).sum()) / (h * w) / b
    return beta / 2 * total


def test_at_value_two_stages_with_different_channels():
    torch.manual_seed(2)
    s = [torch.randn(3, 4, 4, 4), torch.randn(3, 6, 2, 2)]
    t = [torch.randn(3, 8, 4, 4), torch.randn(3, 2, 2, 2)]
    term, s_out, t_out = make_term("at", s, t)
    assert close(run(term, s_out, t_out)["at"], _at_by_hand(s, t))


def test_at_spatial_mismatch_pools_the_larger_map():
    torch.manual_seed(3)
    s, t = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4)
    term, s_out, t_out = make_term("at", [s], [t])
    assert close(run(term, s_out, t_out)["at"], _at_by_hand([block_mean(s, 2)], [t]))


def test_at_vector_against_map_raises():
    term, s_out, t_out = make_term("at", [torch.randn(2, 3)], [torch.randn(2, 3, 4, 4)])
    with pytest.raises(ValueError) as err:
        run(term, s_out, t_out)
    assert "(2, 3)" in str(err.value) and "(2, 3, 4, 4)" in str(err.value)


# --- NST ----------------------------------------------------------------------------------------
def test_nst_value_small_numbers():
    # student channels [1,0], [0,1]; teacher channel [1,0]; poly kernel (x.y)^2:
    # K_ss mean = 1/2, K_tt = 1, K_st mean = 1/2 -> MMD^2 = 1 + 1/2 - 1 = 1/2; loss = 50/2 * 1/2
    s = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    t = torch.tensor([[[[1.0, 0.0]]]])
    term, s_out, t_out = make_term("nst", [s], [t])
    assert close(run(term, s_out, t_out)["nst"], 12.5)


def _nst_by_hand(s, t, lam=50.0):
    b = s.shape[0]
    total = 0.0
    for n in range(b):
        fs = [v / math.sqrt((v ** 2).sum()) for v in s[n].flatten(1)]
        ft = [v / math.sqrt((v ** 2).sum()) for v in t[n].flatten(1)]
        k = lambda x, y: float((x * y).sum()) ** 2  # noqa: E731
        ktt = sum(k(a, c) for a in ft for c in ft) / len(ft) ** 2
        kss = sum(k(a, c) for a in fs for c in fs) / len(fs) ** 2
        kst = sum(k(a, c) for a in fs for c in ft) / (len(fs) * len(ft))
        total += (ktt + kss - 2 * kst) / b
    return lam / 2 * total


def test_nst_value_random_and_spatial_mismatch():
    torch.manual_seed(4)
    s, t = torch.randn(2, 3, 2, 2), torch.randn(2, 5, 2, 2)
    term, s_out, t_out = make_term("nst", [s], [t])
    assert close(run(term, s_out, t_out)["nst"], _nst_by_hand(s, t))
    s_big = torch.randn(2, 3, 4, 4)
    term, s_out, t_out = make_term("nst", [s_big], [t])
    assert close(run(term, s_out, t_out)["nst"], _nst_by_hand(block_mean(s_big, 2), t))



def test_nst_linear_and_gaussian_kernels():
    torch.manual_seed(14)
    s, t = torch.randn(2, 3, 2, 2), torch.randn(2, 4, 2, 2)
    # linear kernel: MMD^2 = || mean_j f_S^j - mean_i f_T^i ||^2 per sample
    expected = 0.0
    for n in range(2):
        ms = sum(v / math.sqrt((v ** 2).sum()) for v in s[n].flatten(1)) / 3
        mt = sum(v / math.sqrt((v ** 2).sum()) for v in t[n].flatten(1)) / 4
        expected += float(((ms - mt) ** 2).sum()) / 2
    term, s_out, t_out = make_term("nst", [s], [t], kernel="linear")
    assert close(run(term, s_out, t_out)["nst"], 25.0 * expected)
    term, s_out, t_out = make_term("nst", [s.requires_grad_()], [t], kernel="gaussian")
    loss = run(term, s_out, t_out)["nst"]
    loss.backward()
    assert loss.item() > 0 and torch.isfinite(s.grad).all()
    with pytest.raises(ValueError):
        create_method("nst", kernel="rbf")

# --- PKT ----------------------------------------------------------------------------------------
def test_pkt_value_small_numbers():
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    s = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # teacher p_{j|i}: row0 [-, 1, 0], row1 [1/2, -, 1/2], row2 [0, 1, -]
    # student q_{j|i}: row0 [-, 2/3, 1/3], row1 [2/3, -, 1/3], row2 [1/2, 1/2, -]
    kl = math.log(1.5) + 0.5 * math.log(0.75) + 0.5 * math.log(1.5) + math.log(2.0)
    term, s_out, t_out = make_term("pkt", [s], [t])
    assert close(run(term, s_out, t_out)["pkt"], 30000 * kl / 6, tol=1e-4)


def test_pkt_value_random_different_dims_and_embedding_maps():
    torch.manual_seed(5)
    s, t = torch.randn(4, 6, 1, 1), torch.randn(4, 3)
    n = 4

    def probs(x):
        x = x.flatten(1)
        k = [[(float(x[i] @ x[j]) / math.sqrt(float(x[i] @ x[i]) * float(x[j] @ x[j])) + 1) / 2
              for j in range(n)] for i in range(n)]
        return [[k[i][j] / sum(k[i][m] for m in range(n) if m != i) for j in range(n)] for i in range(n)]

    p, q = probs(t), probs(s)
    expected = sum(p[i][j] * math.log(p[i][j] / q[i][j]) for i in range(n) for j in range(n) if i != j)
    term, s_out, t_out = make_term("pkt", [s], [t])
    assert close(run(term, s_out, t_out)["pkt"], 30000 * expected / (n * (n - 1)), tol=1e-4)


# --- FT -----------------------------------------------------------------------------------------
def _unit(v):
    return v / math.sqrt(float((v ** 2).sum()))


def test_ft_value_with_identity_paraphraser_and_translator():
    torch.manual_seed(6)
    s, t = torch.rand(2, 4, 2, 2), torch.rand(2, 4, 2, 2)  # non-negative: LeakyReLU is the identity
    term, s_out, t_out = make_term("ft", [s], [t], paraphraser_epochs=0)
    assert term.paraphraser.encoder[-2].out_channels == 2  # rate 0.5
    pin_identity(term)
    expected = 0.0
    for b in range(2):
        fs, ft = _unit(s[b, :2].flatten()), _unit(t[b, :2].flatten())
        expected += float((fs - ft).abs().sum())
    expected = 200 * expected / (2 * 2 * 2 * 2)
    assert close(run(term, s_out, t_out)["ft"], expected)
    # spatial mismatch: the larger factor is pooled to the smaller
    s_big = torch.rand(2, 4, 4, 4)
    term, s_out, t_out = make_term("ft", [s_big], [t], paraphraser_epochs=0)
    pin_identity(term)
    pooled = block_mean(s_big, 2)
    expected = sum(float((_unit(pooled[b, :2].flatten()) - _unit(t[b, :2].flatten())).abs().sum())
                   for b in range(2)) * 200 / 16
    assert close(run(term, s_out, t_out)["ft"], expected)


def test_ft_paraphraser_phase_reconstructs_the_teacher_then_freezes():
    torch.manual_seed(7)
    s, t = torch.rand(2, 4, 2, 2), torch.rand(2, 4, 2, 2)
    term, s_out, t_out = make_term("ft", [s.requires_grad_()], [t], paraphraser_epochs=2)
    pin_identity(term)
    term.set_epoch(0)
    assert not term.uses_hard_labels()
    out = run(term, s_out, t_out)
    # identity convs keep channels 0-1 through the 2-channel bottleneck, channels 2-3 come back as 0
    assert set(out) == {"ft_paraphraser"}
    assert close(out["ft_paraphraser"], float((t[:, 2:] ** 2).sum()) / t.numel())
    out["ft_paraphraser"].backward()
    assert s.grad is None  # the student is not trained while the paraphraser is
    assert all(p.grad is not None for p in term.paraphraser.encoder.parameters())
    assert not any(p.requires_grad for p in term.translator.parameters())
    term.set_epoch(2)
    assert term.uses_hard_labels()
    assert not any(p.requires_grad for p in term.paraphraser.parameters())
    assert all(p.requires_grad for p in term.translator.parameters())
    assert set(run(term, s_out, t_out)) == {"ft"}


def test_ft_both_phases_train_within_one_run():
    losses = short_training("ft", epochs=4, paraphraser_epochs=2)
    assert losses[1] < losses[0] and losses[3] < losses[2], losses


# --- AB -----------------------------------------------------------------------------------------
def test_ab_value_small_numbers_and_layer_weights():
    # stage 0 (weight 1/2), margin 1:
    #   s=0.5,t=1 -> (1-0.5)^2=0.25 ; s=-2,t=0 -> relu(1-2)^2=0 ; s=1.5,t=-1 -> 2.5^2=6.25 ; s=-0.5,t=2 -> 1.5^2=2.25
    # stage 1 (weight 1): s=0, t=3 -> 1
    s0 = torch.tensor([[[[0.5, -2.0]], [[1.5, -0.5]]]])
    t0 = torch.tensor([[[[1.0, 0.0]], [[-1.0, 2.0]]]])
    s1, t1 = torch.tensor([[[[0.0]]]]), torch.tensor([[[[3.0]]]])
    term, s_out, t_out = make_term("ab", [s0, s1], [t0, t1])
    pin_identity(term)
    assert close(run(term, s_out, t_out)["ab"], 3 / 1000 * (0.5 * 8.75 + 1.0))


def test_ab_spatial_mismatch_and_phases():
    torch.manual_seed(8)
    s, t = torch.randn(2, 2, 4, 4), torch.randn(2, 2, 2, 2)
    term, s_out, t_out = make_term("ab", [s], [t], weight=2.0)
    pin_identity(term)
    ps = block_mean(s, 2)
    expected = 0.0
    for v, target in zip(ps.flatten().tolist(), t.flatten().tolist()):
        expected += max(1 - v, 0) ** 2 if target > 0 else max(1 + v, 0) ** 2
    expected = 2.0 * 3 / 1000 * expected / 2
    assert close(run(term, s_out, t_out)["ab"], expected)
    assert not term.uses_hard_labels()  # epoch 0 of 30 init epochs
    term.set_epoch(30)
    assert term.uses_hard_labels() and run(term, s_out, t_out) == {}
    term, s_out, t_out = make_term("ab", [s], [t], init_epochs=0, keep_after_init=True)
    assert term.uses_hard_labels() and "ab" in run(term, s_out, t_out)
    with pytest.raises(ValueError):
        create_method("ab", init_epochs=0)


# --- VID ----------------------------------------------------------------------------------------
def test_vid_value_identity_regressor_and_mismatch():
    torch.manual_seed(9)
    s, t = torch.rand(2, 3, 2, 2), torch.randn(2, 3, 2, 2)  # s >= 0: the regressor's ReLUs pass it
    term, s_out, t_out = make_term("vid", [s], [t])
    pin_identity(term.regressors)
    var = 5.0  # init_pred_var
    expected = sum(0.5 * ((a - b) ** 2 / var + math.log(var))
                   for a, b in zip(s.flatten().tolist(), t.flatten().tolist())) / s.numel()
    assert close(run(term, s_out, t_out)["vid"], expected)
    s_big = torch.rand(2, 3, 4, 4)
    term, s_out, t_out = make_term("vid", [s_big], [t])
    pin_identity(term.regressors)
    expected = sum(0.5 * ((a - b) ** 2 / var + math.log(var))
                   for a, b in zip(block_mean(s_big, 2).flatten().tolist(), t.flatten().tolist())) / t.numel()
    assert close(run(term, s_out, t_out)["vid"], expected)


# --- OFD ----------------------------------------------------------------------------------------
def test_ofd_margin_is_the_gaussian_conditional_mean():
    torch.manual_seed(10)
    t = torch.randn(4, 2, 3, 3) * torch.tensor([1.0, 2.0]).view(1, 2, 1, 1) + torch.tensor([0.5, -1.0]).view(1, 2, 1, 1)
    term, _, _ = make_term("ofd", [torch.randn(4, 3, 3, 3)], [t])
    for c in range(2):
        vals = t[:, c].flatten().tolist()
        mu = sum(vals) / len(vals)
        sigma = math.sqrt(sum((v - mu) ** 2 for v in vals) / len(vals))
        z = mu / sigma
        neg_mass = 0.5 * (1 + math.erf(-z / math.sqrt(2)))
        pdf = math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
        assert close(term.margin_0[c], mu - sigma * pdf / neg_mass, tol=1e-4)


def test_ofd_value_partial_l2_with_margin_relu():
    # margin -0.5; elements (s, t) -> target max(t, m), loss:
    # (0,-2)->(0+0.5)^2=.25 ; (-1,-2): s<=-0.5<=0 -> 0 ; (0.3,-0.2)->.25 ; (2,1)->1 ; (-1,1)->4   => 5.5
    s1 = torch.tensor([[[[0.0, -1.0, 0.3, 2.0, -1.0]]]])
    t1 = torch.tensor([[[[-2.0, -2.0, -0.2, 1.0, 1.0]]]])
    # stage 0 (weight 1/2): (1, 3) -> 4
    s0, t0 = torch.tensor([[[[1.0]]]]), torch.tensor([[[[3.0]]]])
    term, s_out, t_out = make_term("ofd", [s0, s1], [t0, t1])
    pin_identity(term)
    with torch.no_grad():
        term.margin_0.fill_(-0.5)
        term.margin_1.fill_(-0.5)
    assert close(run(term, s_out, t_out)["ofd"], 1e-3 * (0.5 * 4.0 + 5.5))


def test_ofd_spatial_mismatch_pools_the_larger_map():
    torch.manual_seed(11)
    s, t = torch.randn(2, 2, 4, 4), torch.rand(2, 2, 2, 2)  # t >= 0: margin irrelevant
    term, s_out, t_out = make_term("ofd", [s], [t], weight=1.0)
    pin_identity(term)
    ps = block_mean(s, 2)
    expected = sum(0.0 if (a <= b <= 0) else (a - b) ** 2
                   for a, b in zip(ps.flatten().tolist(), t.flatten().tolist())) / 2
    assert close(run(term, s_out, t_out)["ofd"], expected)


# --- ReviewKD -----------------------------------------------------------------------------------
def _mse(a, b):
    return float(((a - b) ** 2).sum()) / a.numel()


def test_reviewkd_value_two_levels_identity_abfs_and_warmup():
    torch.manual_seed(12)
    s0, s1 = torch.randn(1, 2, 2, 2), torch.randn(1, 2, 1, 1)
    t0, t1 = torch.randn(1, 2, 2, 2), torch.randn(1, 2, 1, 1)
    term, s_out, t_out = make_term("reviewkd", [s0, s1], [t0, t1])
    pin_identity(term)
    with torch.no_grad():  # attention logits 0 -> both fusion weights sigmoid(0) = 1/2
        term.abfs[0].attention[0].weight.zero_()
        term.abfs[0].attention[0].bias.zero_()
    # deepest level: out1 = s1 (1x1 map: no pyramid levels); level 0: out0 = s0/2 + upsampled s1/2
    out1 = s1
    out0 = 0.5 * s0 + 0.5 * s1.expand(1, 2, 2, 2)
    hcl1 = _mse(out1, t1)
    hcl0 = (_mse(out0, t0) + 0.5 * _mse(out0.mean(dim=(2, 3)), t0.mean(dim=(2, 3)))) / 1.5
    term.set_epoch(0)
    assert close(run(term, s_out, t_out)["reviewkd"], (hcl0 + hcl1) / 20)  # warm-up 1/20
    term.set_epoch(25)
    assert close(run(term, s_out, t_out)["reviewkd"], hcl0 + hcl1)


def test_reviewkd_spatial_mismatch_interpolates_and_level_mismatch_raises():
    torch.manual_seed(13)
    s0, s1 = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 1, 1)
    t0, t1 = torch.randn(1, 2, 2, 2), torch.randn(1, 2, 1, 1)
    term, s_out, t_out = make_term("reviewkd", [s0, s1], [t0, t1], warmup_epochs=0)
    pin_identity(term)
    with torch.no_grad():
        term.abfs[0].attention[0].weight.zero_()
        term.abfs[0].attention[0].bias.zero_()
    fused = 0.5 * s0 + 0.5 * s1.expand(1, 2, 4, 4)
    out0 = fused[:, :, ::2, ::2]  # nearest 4x4 -> 2x2 takes rows / columns 0 and 2
    hcl0 = (_mse(out0, t0) + 0.5 * _mse(out0.mean(dim=(2, 3)), t0.mean(dim=(2, 3)))) / 1.5
    assert close(run(term, s_out, t_out)["reviewkd"], hcl0 + _mse(s1, t1))
    with pytest.raises(ValueError, match="levels"):
        make_term("reviewkd", [s0, s1], [t1])
