"""Adversarial distillation: the discriminator's losses by hand, which step moves which weights, digits runs
(beside KL, on a feature point, the MEAL-V2 preset with 2 teachers), exact resume, and the one-line errors."""
import copy
import math

import pytest
import torch
import torch.nn as nn

import kdray
from kdray.algorithms.distiller import Distiller, Teacher
from kdray.algorithms.engine import NonFiniteLossError
from kdray.algorithms.schemes.adversarial import (AdversarialLoop, FeatureDiscriminator, LogitDiscriminator,
                                                  discriminator_hits, discriminator_loss, fool_loss)
from kdray.config import ConfigError, load_config
from jobs import digits_job

pytestmark = pytest.mark.usefixtures("one_thread")

TEACHER = {"model": "digits_cnn", "train": {"epochs": 4, "lr": 0.05, "batch_size": 32}}
# train_disc_acc of the digits run below (a 64-wide MLP student, half the training split, 15 epochs,
# discriminator lr 5e-5), measured over its last 5 epochs: 0.50 0.51 0.51 0.52 0.50 (test top-1 0.961): the
# student's outputs are as good as the teacher's to the discriminator. With the 16-wide MLP of digits_job (0.29 top-1)
# and lr 2e-4 it kept an edge, 0.69-0.72: a student that cannot match the teacher cannot fool it.
DISC_ACC_BAND = (0.4, 0.6)
FOOLING_RUN = dict(train__epochs=15, student={"model": "digits_mlp", "args": {"hidden": 64}},
                   adversarial={"lr": 5e-5}, data={"name": "digits", "options": {"train_fraction": 0.5}})


def softplus(x):
    return math.log1p(math.exp(x))


def test_discriminator_and_fool_losses_by_hand():
    real, fake = torch.tensor([0.0, 2.0]), torch.tensor([-1.0, 3.0])
    # BCE(s, 1) = softplus(-s); BCE(s, 0) = softplus(s)
    expected_d = (softplus(0.0) + softplus(-2.0)) / 2 + (softplus(-1.0) + softplus(3.0)) / 2
    assert discriminator_loss(real, fake).item() == pytest.approx(expected_d, rel=1e-6)
    assert fool_loss(fake).item() == pytest.approx((softplus(1.0) + softplus(-3.0)) / 2, rel=1e-6)
    assert discriminator_hits(real, fake) == (2, 4)  # real 2.0 > 0 and fake -1.0 <= 0 are right
    # a discriminator that cannot tell (all scores 0) costs 2 ln 2, the fool loss ln 2
    zeros = torch.zeros(5)
    assert discriminator_loss(zeros, zeros).item() == pytest.approx(2 * math.log(2), rel=1e-6)
    assert fool_loss(zeros).item() == pytest.approx(math.log(2), rel=1e-6)


def test_discriminators_read_probabilities_and_project_features():
    torch.manual_seed(0)
    d = LogitDiscriminator(num_classes=4, hidden=8)
    logits = torch.randn(3, 4)
    assert d(logits).shape == (3,)
    torch.testing.assert_close(d(logits), d(logits + 5.0))  # softmax probabilities: a shift changes nothing
    torch.testing.assert_close(d(logits, logits[:1]), torch.cat([d(logits), d(fake=logits[:1])]))
    f = FeatureDiscriminator(student_width=6, teacher_width=10, hidden=8)
    scores = f(torch.randn(2, 10, 3, 3), torch.randn(4, 6, 3, 3))  # maps pooled; the student's projected
    assert scores.shape == (6,) and isinstance(f.project, nn.Linear)
    assert isinstance(FeatureDiscriminator(10, 10).project, nn.Identity)


def test_conditional_discriminators_read_the_label_beside_the_output():
    """Xu et al.'s conditional discriminator: the same outputs with other labels score differently, and its
    first layer is wider by the number of classes; without labels it refuses in one line."""
    torch.manual_seed(0)
    d = LogitDiscriminator(num_classes=4, hidden=8, conditional=True)
    assert d.net[0].in_features == 8 and LogitDiscriminator(4, 8).net[0].in_features == 4
    logits, a, b = torch.randn(3, 4), torch.tensor([0, 1, 2]), torch.tensor([3, 3, 3])
    assert not torch.allclose(d(logits, labels=a), d(logits, labels=b))
    both = d(logits[:2], logits[:2] * 2.0, labels=a[:2])  # one call: teacher rows then student rows, same labels
    torch.testing.assert_close(both, torch.cat([d(logits[:2], labels=a[:2]), d(fake=logits[:2] * 2.0, labels=a[:2])]))
    f = FeatureDiscriminator(student_width=6, teacher_width=10, hidden=8, num_classes=4)
    assert f.net[0].in_features == 14 and f(torch.randn(2, 10), torch.randn(2, 6), labels=a[:2]).shape == (4,)
    with pytest.raises(ValueError, match="conditional discriminator needs the samples' labels"):
        d(logits)


def _tiny_loop(d_steps=1, weight=1.0):
    torch.manual_seed(0)
    student, teacher = nn.Linear(4, 3), Teacher(nn.Linear(4, 3))
    distiller = Distiller(student, [], ce_weight=1.0)
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)), torch.arange(8)) for _ in range(3)]
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    disc = LogitDiscriminator(3, hidden=8)
    disc_opt = torch.optim.Adam(disc.parameters(), lr=1e-2)
    loop = AdversarialLoop(discriminator=disc, disc_optimizer=disc_opt, weight=weight, d_steps=d_steps,
                           distiller=distiller, teacher=teacher, optimizer=opt,
                           scheduler=torch.optim.lr_scheduler.ConstantLR(opt, 1.0), train_loader=data,
                           val_loader=data, num_classes=3, epochs=2, device=torch.device("cpu"))
    return loop, student, disc


def _watch(optimizer, others, record):
    """Record, at each ``optimizer.step()``, whether ``others`` stayed unchanged and its own params moved."""
    own = [p for g in optimizer.param_groups for p in g["params"]]
    step = optimizer.step

    def watched(*args, **kwargs):
        before_others, before_own = [p.detach().clone() for p in others], [p.detach().clone() for p in own]
        out = step(*args, **kwargs)
        record.append((all(torch.equal(b, p) for b, p in zip(before_others, others)),
                       any(not torch.equal(b, p) for b, p in zip(before_own, own))))
        return out

    optimizer.step = watched


def test_discriminator_step_leaves_the_student_and_student_step_leaves_the_discriminator():
    loop, student, disc = _tiny_loop(d_steps=2)
    d_record, s_record = [], []
    _watch(loop.disc_optimizer, list(student.parameters()), d_record)
    _watch(loop.optimizer, list(disc.parameters()), s_record)
    metrics = loop.train_epoch(0)
    assert len(d_record) == 6 and len(s_record) == 3  # 3 batches, 2 discriminator updates each
    assert all(others_kept and moved for others_kept, moved in d_record + s_record), (d_record, s_record)
    assert {"train_adv", "train_ce", "train_disc_loss", "train_disc_acc"} <= set(metrics)
    assert 0.0 <= metrics["train_disc_acc"] <= 1.0


def test_non_finite_discriminator_loss_raises():
    loop, _, disc = _tiny_loop()
    with torch.no_grad():
        disc.net[0].weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="discriminator loss"):
        loop.train_epoch(0)


def _job(tmp_path, **over):
    return digits_job(tmp_path, **{"scheme": "adversarial", "teacher": TEACHER, **over})


class Recorder:
    """Epoch metrics of the adversarial stage, and its loop's state at its last epoch."""

    def __init__(self, stop_after=None):
        self.metrics, self.state, self.stop_after = [], None, stop_after

    def on_epoch_end(self, epoch, metrics, loop):
        if metrics["kind"] != "adversarial":
            return
        self.metrics.append(metrics)
        self.state = copy.deepcopy({k: loop.state_dict()[k] for k in ("distiller", "discriminator")})
        if self.stop_after is not None and epoch == self.stop_after:
            raise KeyboardInterrupt


def test_digits_run_fools_the_discriminator(tmp_path):
    rec = Recorder()
    result = kdray.distill(_job(tmp_path, **FOOLING_RUN), callbacks=[rec], quiet=True, log=lambda *a: None)
    assert [s["kind"] for s in result.stages] == ["teacher", "adversarial"]
    assert result.stages[-1]["name"] == "kd+adversarial-seed0"
    assert len(rec.metrics) == 15
    for m in rec.metrics:
        assert all(math.isfinite(m[k]) for k in ("train_loss", "train_kd", "train_adv", "train_disc_loss"))
        assert 0.0 <= m["train_disc_acc"] <= 1.0
    low, high = DISC_ACC_BAND
    assert low <= rec.metrics[-1]["train_disc_acc"] <= high, [m["train_disc_acc"] for m in rec.metrics]
    print("train_disc_acc per epoch", [round(m["train_disc_acc"], 3) for m in rec.metrics])
    assert result.stages[-1]["test_top1"] > 0.9  # chance is 0.1


def test_feature_discriminator_and_instead_mode_run(tmp_path):
    rec = Recorder()
    result = kdray.distill(_job(tmp_path, student={"model": "digits_cnn", "args": {"width": 8}}, train__epochs=2, methods=[],
                                adversarial={"on": "feature", "feature": "pool", "mode": "instead"}),
                           callbacks=[rec], quiet=True, log=lambda *a: None)
    assert result.stages[-1]["name"] == "adversarial-seed0" and len(rec.metrics) == 2
    assert "train_kd" not in rec.metrics[-1] and math.isfinite(rec.metrics[-1]["train_adv"])
    assert isinstance(rec.state["discriminator"]["project.weight"], torch.Tensor)  # 8-wide student -> teacher


def test_meal_v2_preset_with_two_teachers_logs_the_discriminator_to_mlflow(tmp_path, mlflow_uri):
    cfg = _job(tmp_path, teachers=[TEACHER, {**TEACHER, "args": {"width": 8}}], train__epochs=2,
               adversarial={"preset": "meal_v2"}, mlflow={"tracking_uri": mlflow_uri, "enabled": True,
                                                         "system_metrics": False})
    cfg.pop("teacher")
    cfg.pop("methods")  # the preset's own
    checked = load_config(cfg)
    assert checked.ce_weight == 0 and [m.model_dump() for m in checked.methods] == [
        {"name": "kd", "alpha": 1.0, "temperature": 1.0}]
    rec = Recorder()
    result = kdray.distill(cfg, callbacks=[rec], quiet=True, log=lambda *a: None)
    assert [s["kind"] for s in result.stages] == ["teacher", "teacher", "adversarial"]
    assert result.stages[-1]["teachers"] == ["stage:teacher-0", "stage:teacher-1"]
    assert rec.metrics[-1]["train_ce"] == 0.0 and all(math.isfinite(m["train_adv"]) for m in rec.metrics)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    exp = client.get_run(result.parent_run_id).info.experiment_id
    [run] = client.search_runs([exp], "attributes.run_name = 'kd+adversarial-seed0'")
    for key in ("train_disc_acc", "train_disc_loss", "train_adv"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [h.step for h in history] == [0, 1], key


def test_resume_gives_the_uninterrupted_weights(tmp_path):
    over = dict(train__epochs=4, teacher__train__epochs=2, checkpoint={"every_epochs": 1})
    whole = Recorder()
    kdray.distill(_job(tmp_path / "whole", **over), callbacks=[whole], quiet=True, log=lambda *a: None)
    cut = Recorder(stop_after=1)
    cfg = _job(tmp_path / "cut", **over)
    with pytest.raises(KeyboardInterrupt):
        kdray.distill(cfg, callbacks=[cut], quiet=True, log=lambda *a: None)
    resumed = Recorder()
    kdray.distill(cfg, resume=True, callbacks=[resumed], quiet=True, log=lambda *a: None)
    assert [m["epoch"] for m in resumed.metrics] == [2, 3]
    for part in ("distiller", "discriminator"):
        assert whole.state[part].keys() == resumed.state[part].keys()
        for key, value in whole.state[part].items():
            torch.testing.assert_close(resumed.state[part][key], value, rtol=0, atol=0, msg=f"{part}.{key}")


@pytest.mark.parametrize("over,pattern", [
    (dict(adversarial={"on": "feature"}), r"adversarial: .*on: feature needs adversarial.feature"),
    (dict(adversarial={"feature": "pool"}), r"feature .* is read only with adversarial.on: feature"),
    (dict(adversarial={"betas": [0.5, 1.5]}), r"betas must be two numbers in \[0, 1\)"),
    (dict(adversarial={"preset": "meal_v2"}, ce_weight=0.5), r"meal_v2 trains without hard labels"),
    (dict(adversarial={"preset": "meal_v2", "on": "feature", "feature": "pool"}), r"meal_v2 uses on: logits"),
    (dict(adversarial={"preset": "meal_v2"}, methods=[{"name": "dkd"}]), r"meal_v2 sets methods"),
    (dict(adversarial={"mode": "instead"}, methods=[{"name": "kd"}]), r"mode: instead .* remove methods"),
    (dict(teachers=[TEACHER]), r"teacher: \(one\) or teachers: \[...\] \(an ensemble\), not both"),
    (dict(teacher=None), r"needs a teacher"),
    (dict(teacher=None, teachers=[TEACHER, TEACHER], adversarial={"on": "feature", "feature": "pool"}),
     r"on: feature needs one live teacher"),
    (dict(adversarial={"d_steps": 0}), r"adversarial.d_steps: Input should be greater than or equal to 1"),
    (dict(adversarial={"preset": "meal_v2", "conditional": True}), r"meal_v2 uses an unconditional discriminator"),
])
def test_bad_adversarial_configs_fail_in_one_line(tmp_path, over, pattern):
    cfg = _job(tmp_path, **over)
    if cfg.get("teacher") is None:
        cfg.pop("teacher")
    with pytest.raises(ConfigError, match=pattern) as err:
        load_config(cfg)
    assert "\n" not in str(err.value)


def _ddp_worker(rank, world, init, out_dir):
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from kdray.orchestrator.job import run_job
    from kdray.orchestrator.placement import WorkerContext

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)

    class Keep:
        def on_epoch_end(self, epoch, metrics, loop):
            if metrics["kind"] == "adversarial":
                assert isinstance(loop.discriminator, DistributedDataParallel)
                torch.save(loop.state_dict()["discriminator"], os.path.join(out_dir, f"d{rank}.pt"))

    class NoCheckpoints:
        def latest(self):
            return None

        def save(self, payload, metrics):
            pass

    cfg = load_config(_job(out_dir, teacher={**TEACHER, "train": {**TEACHER["train"], "epochs": 1}}, train__epochs=2,
                           ray={"num_workers": 2}))
    ctx = WorkerContext(rank=rank, world_size=world, checkpoints=NoCheckpoints(), log=lambda _: None,
                        wrap=lambda m: DistributedDataParallel(m), callbacks=[Keep()])
    run_job(cfg, ctx)
    dist.barrier()
    os._exit(0)


def test_discriminator_is_ddp_wrapped_and_stays_in_sync_on_two_processes(tmp_path):
    """Two gloo processes, each wrapping the distiller and the discriminator in DDP (as Ray Train's workers do):
    the replicas' discriminators end equal (their gradients were averaged) and finite."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, f"file://{tmp_path}/pg", tmp_path), nprocs=2, join=True)
    d0, d1 = (torch.load(tmp_path / f"d{r}.pt", weights_only=True) for r in (0, 1))
    for key in d0:
        torch.testing.assert_close(d0[key], d1[key], rtol=0, atol=0, msg=key)
    assert all(torch.isfinite(v).all() for v in d0.values())


class DiscriminatorPerRank:
    """Epoch callback on each Ray Train worker: its rank's discriminator and student weights after the epoch."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_epoch_end(self, epoch, metrics, loop):
        if metrics["kind"] != "adversarial":
            return
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        state = loop.state_dict()
        torch.save({"discriminator": state["discriminator"], "distiller": state["distiller"],
                    "disc_acc": metrics["train_disc_acc"]}, f"{self.folder}/rank{rank}-epoch{epoch}.pt")


@pytest.mark.ray
def test_conditional_adversarial_run_on_two_ray_train_workers_keeps_both_parts_in_step(tmp_path, ray_session):
    """``scheme: adversarial`` on 2 Ray Train workers (gloo) with a conditional logit discriminator: after each
    epoch both ranks hold the same discriminator and the same student (DDP reduced both parts' gradients),
    the discriminator's accuracy is logged, the student is tested."""
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    folder = tmp_path / "per-rank"
    folder.mkdir()
    cfg = _job(tmp_path, ray={"num_workers": 2}, teacher={**TEACHER, "train": {**TEACHER["train"], "epochs": 1}},
               train__epochs=2, adversarial={"conditional": True})
    result = kdray.distill(cfg, callbacks=[DiscriminatorPerRank(str(folder))], quiet=True)
    assert result.accuracies("adversarial")[0] > 0.1
    for epoch in (0, 1):
        a, b = (torch.load(folder / f"rank{r}-epoch{epoch}.pt", weights_only=True) for r in (0, 1))
        assert a["discriminator"]["net.0.weight"].shape[1] == 20  # 10 probabilities + 10 one-hot
        for part in ("discriminator", "distiller"):
            for key, value in a[part].items():
                assert torch.allclose(value.float(), b[part][key].float(), atol=1e-6), (part, key)
        assert 0.0 <= a["disc_acc"] <= 1.0


def test_an_unquoted_yaml_on_key_is_read_as_on(tmp_path):
    """PyYAML reads ``on:`` as the boolean True (YAML 1.1); the adversarial section takes it as ``on``."""
    import yaml

    section = yaml.safe_load("adversarial: {on: feature, feature: pool}")["adversarial"]
    assert True in section
    cfg = load_config(_job(tmp_path, student={"model": "digits_cnn", "args": {"width": 8}}, adversarial=section))
    assert cfg.adversarial.on == "feature" and cfg.adversarial.feature == "pool"
