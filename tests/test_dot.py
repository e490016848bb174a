"""DOT (Zhao et al. ICCV 2023): separate momenta for the task and the distillation gradients."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import kdray
from kdray.algorithms.engine import TrainLoop
from kdray.algorithms.optim import DOT, make_optimizer
from kdray.cli import main as cli_main
from jobs import digits_job

pytestmark = pytest.mark.usefixtures("one_thread")


def _dot_step(opt, params, task_fn, kd_fn):
    opt.zero_grad(set_to_none=True)
    kd_fn(*params).backward()
    opt.step_kd()
    task_fn(*params).backward()
    opt.step()


def test_two_steps_on_two_parameters_equal_the_formula():
    # task = 3 p1 + p2^2, kd = p1 p2, from p = (1, 2), lr 0.1, beta 0.9, delta 0.075 (task 0.825, kd 0.975).
    # step 1: g_task = (3, 4), g_kd = (2, 1), buffers = gradients -> p = (1, 2) - 0.1 (5, 5) = (0.5, 1.5)
    # step 2: g_task = (3, 3), g_kd = (1.5, 0.5); b_task = 0.825 (3, 4) + (3, 3) = (5.475, 6.3),
    #         b_kd = 0.975 (2, 1) + (1.5, 0.5) = (3.45, 1.475) -> p = (0.5 - 0.8925, 1.5 - 0.7775)
    p1, p2 = torch.tensor(1.0, requires_grad=True), torch.tensor(2.0, requires_grad=True)
    opt = DOT([p1, p2], lr=0.1, momentum=0.9, delta=0.075)
    for _ in range(2):
        _dot_step(opt, (p1, p2), lambda a, b: 3 * a + b ** 2, lambda a, b: a * b)
    assert p1.item() == pytest.approx(-0.3925, abs=1e-6)
    assert p2.item() == pytest.approx(0.7225, abs=1e-6)
    assert torch.equal(opt.state[p1]["kd_momentum"], torch.tensor(3.45))


def test_parameter_reached_by_one_loss_takes_plain_momentum_and_weight_decay():
    # p3 is only in the KD loss (a connector): beta = 0.9 and weight decay on its KD gradient.
    # kd = 2 p3, p3 = 1, wd 0.1: g = 2.1 -> p3 = 0.79; then g = 2.079, b = 0.9 * 2.1 + 2.079 = 3.969
    p3 = torch.tensor(1.0, requires_grad=True)
    opt = DOT([p3], lr=0.1, momentum=0.9, delta=0.075, weight_decay=0.1)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        (2 * p3).backward()
        opt.step_kd()
        opt.step()
    assert p3.item() == pytest.approx(0.79 - 0.3969, abs=1e-6)


def test_a_step_without_the_kd_gradient_apart_is_refused():
    p = torch.tensor(1.0, requires_grad=True)
    opt = DOT([p], lr=0.1)
    (p * 2).backward()
    with pytest.raises(RuntimeError, match="needs the KD and CE gradients apart.*use train.optimizer: sgd"):
        opt.step()
    assert p.item() == 1.0


def test_delta_zero_equals_sgd_momentum():
    torch.manual_seed(0)
    x, y, soft = torch.randn(16, 5), torch.randint(0, 3, (16,)), torch.randn(16, 3).softmax(1)
    models = [torch.nn.Linear(5, 3) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    dot = DOT(models[0].parameters(), lr=0.1, momentum=0.9, delta=0.0, weight_decay=5e-4)
    sgd = torch.optim.SGD(models[1].parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    def task(m):
        return F.cross_entropy(m(x), y)

    def kd(m):
        return F.kl_div(m(x).log_softmax(1), soft, reduction="batchmean")

    for _ in range(5):
        dot.zero_grad(set_to_none=True)
        kd(models[0]).backward()
        dot.step_kd()
        task(models[0]).backward()
        dot.step()
        sgd.zero_grad()
        (task(models[1]) + kd(models[1])).backward()
        sgd.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_state_dict_round_trip_keeps_both_buffers():
    p = torch.tensor([1.0, -1.0], requires_grad=True)
    opt = DOT([p], lr=0.1)
    _dot_step(opt, (p,), lambda a: (a ** 2).sum(), lambda a: a.sum())
    q = p.detach().clone().requires_grad_(True)
    restored = DOT([q], lr=0.1)
    restored.load_state_dict(copy.deepcopy(opt.state_dict()))  # a checkpoint is a copy
    _dot_step(opt, (p,), lambda a: (a ** 2).sum(), lambda a: a.sum())
    _dot_step(restored, (q,), lambda a: (a ** 2).sum(), lambda a: a.sum())
    assert torch.equal(p, q) and set(restored.state[q]) == {"task_momentum", "kd_momentum"}


def test_bad_delta_fp16_and_data_parallel_are_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="momentum \\+ dot_delta < 1"):
        make_optimizer([torch.zeros(1, requires_grad=True)], "dot", 0.1, momentum=0.95, dot_delta=0.1)
    for over, match in ((dict(train__optimizer="dot", train__precision="fp16"), "train.precision: bf16|fp16"),
                        (dict(train__optimizer="dot", ray__num_workers=2), "ray.num_workers: 1 or 0"),
                        (dict(train__optimizer="dot", train__dot_delta=0.2), "dot_delta <= momentum")):
        with pytest.raises(kdray.ConfigError, match=match) as err:
            kdray.load_config(digits_job(tmp_path, **over))
        assert "\n" not in str(err.value)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="precision: fp16"):
        TrainLoop(torch.nn.Module(), None, DOT(model.parameters(), lr=0.1), None, [], [], 2, 1, "cpu",
                  precision="fp16")


def test_digits_kd_with_dot_trains(tmp_path):
    seen = []

    class Record:
        def on_epoch_end(self, epoch, metrics, loop):
            if metrics.get("kind") == "distill":
                seen.append(metrics)
                assert isinstance(loop.optimizer, DOT)

    cfg = digits_job(tmp_path, train__optimizer="dot")  # 8 + 8 epochs
    result = kdray.distill(cfg, callbacks=[Record()], quiet=True)
    losses = [m["train_loss"] for m in seen]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.9 * losses[0], losses  
    assert result.accuracies("distill")[0] > 0.6  # seen 0.786 (SGD: 0.744)


def test_list_optimizers_shows_dot(capsys):
    assert cli_main(["list", "optimizers"]) == 0
    out = capsys.readouterr().out
    assert "dot\tDOT, Zhao et al. ICCV 2023" in out and "sgd\t" in out
