"""Feature-level multi-teacher (one connector per teacher), in one process and sharded over 2 gloo
processes, and teachers whose classes come in another order."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import kdray
from kdray.algorithms.base import Batch, create_method
from kdray.algorithms.distiller import ClassOrderError, Distiller, Teacher, class_order
from kdray.algorithms.engine import seed_everything
from kdray.algorithms.schemes.multi_teacher import TeacherEnsemble, combine
from kdray.config import ConfigError, load_config
from kdray.models import create_model
from kdray.orchestrator.placement import ShardedTeacherEnsemble
from jobs import digits_job

TEACHERS = [("digits_cnn", {"width": 16}), ("digits_cnn", {"width": 4}), ("digits_mlp", {"hidden": 24})]


def _teacher_models(n=2):
    models = []
    for k, (name, args) in enumerate(TEACHERS[:n]):
        seed_everything(10 + k)
        models.append(create_model(name, 10, **args).eval())
    return models


def _student():
    seed_everything(0)
    return create_model("digits_cnn", 10, width=8)


def _inputs(n, seed):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _batch(n=12, seed=1):
    return Batch(_inputs(n, seed), torch.arange(n) % 10, torch.arange(n))


def _multi(methods, models, rule="mean", weights=None, seed=3, sharded=None):
    """(distiller, ensemble) built on a fixed example: connectors get the same init everywhere."""
    distiller = Distiller(_student(), [create_method(name, **params) for name, params in methods],
                          num_teachers=len(models))
    teachers = [Teacher(m, distiller.resolve_teacher_points(m, member=i)) for i, m in enumerate(models)]
    ensemble = (TeacherEnsemble(teachers, rule, weights, seed=seed) if sharded is None
                else ShardedTeacherEnsemble(teachers, *sharded, rule, weights, seed=seed))
    seed_everything(5)
    distiller.build(_inputs(4, 99), ensemble, num_samples=64)
    return distiller, ensemble


def _fitnet_by_hand(term, s_out, member):
    (s_point,), (t_point,) = term.student_points[:1], term.teacher_points[:1]
    return term.weight * F.mse_loss(term.regressor(s_out.features[s_point]), member.features[t_point])


def test_per_teacher_connectors_shapes_loss_and_gradients():
    models = _teacher_models(2)  # widths 16 and 4: hint maps of 16 and 4 channels at stage1
    distiller, ensemble = _multi([("fitnet", {"weight": 1.0})], models)
    assert distiller.term_teachers == [0, 1] and len(distiller.terms) == 2
    convs = [t.regressor[0] for t in distiller.terms]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(8, 16), (8, 4)]
    assert convs[0] is not convs[1]

    distiller.train()
    batch = _batch()
    t_out = ensemble(batch.inputs)
    _, losses = distiller(batch, t_out)
    s_out = distiller.student_forward(batch.inputs)
    by_hand = [_fitnet_by_hand(term, s_out, t_out.members[m]) for m, term in enumerate(distiller.terms)]
    assert set(losses) == {"ce", "fitnet"}
    assert torch.allclose(losses["fitnet"], (by_hand[0] + by_hand[1]) / 2, atol=1e-6, rtol=0)
    assert abs(float(by_hand[0].detach() - by_hand[1].detach())) > 1e-3  # the two teachers really differ
    assert torch.allclose(distiller.member_losses["fitnet_t1"], by_hand[1].detach())

    sum(losses.values()).backward()
    for conv in convs:
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in ensemble.parameters())


def test_teachers_of_different_architectures_each_get_their_connector():
    models = [_teacher_models(3)[0], _teacher_models(3)[2]]  # a CNN (embedding 32) and an MLP (embedding 24)
    distiller, ensemble = _multi([("kd", {}), ("crd", {"feat_dim": 8, "nce_k": 16})], models)
    assert distiller.term_teachers == [None, 0, 1]  # kd reads the combined logits, crd is per teacher
    assert [t.embed_t.linear.in_features for t in distiller.terms[1:]] == [32, 24]
    assert distiller.terms[1].teacher_points == ["pool"] and distiller.terms[2].teacher_points == ["body"]
    _, losses = distiller(_batch(), ensemble(_batch().inputs))
    assert set(losses) == {"ce", "kd", "crd"} and all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("rule", ["weights", "confidence", "random"])
def test_feature_losses_follow_the_combine_rule(rule):
    models = _teacher_models(2)
    distiller, ensemble = _multi([("at", {})], models, rule, weights=[3.0, 1.0])
    batch = _batch()
    t_out = ensemble(batch.inputs)
    _, losses = distiller(batch, t_out)
    per = torch.stack([distiller.member_losses[f"at_t{m}"] for m in range(2)])
    expected = {"weights": torch.tensor([0.75, 0.25])}.get(rule, t_out.member_weights)
    assert torch.allclose(losses["at"], (expected * per).sum(), atol=1e-7)
    if rule == "random":  # the teacher drawn for the logits is the one whose feature term counts
        pick = int(t_out.member_weights.argmax())
        assert t_out.member_weights.tolist() == [float(m == pick) for m in range(2)]
        assert torch.equal(t_out.logits, t_out.members[pick].logits)
    if rule == "confidence":
        stacked = torch.stack([o.logits for o in t_out.members])
        log_p = F.log_softmax(stacked, 2)
        w = torch.softmax((log_p.exp() * log_p).sum(2), 0)  # softmax(-entropy) over teachers
        assert torch.allclose(t_out.member_weights, w.mean(1)) and torch.allclose(t_out.member_weights.sum(),
                                                                                   torch.tensor(1.0))


def test_combine_weights_sum_to_one():
    stacked = torch.randn(3, 5, 10)
    for rule in ["mean", "weights", "confidence", "random"]:
        _, w = combine(stacked, rule, [1.0, 2.0, 1.0], torch.Generator().manual_seed(0))
        assert w.shape == (3,) and torch.allclose(w.sum(), torch.tensor(1.0))


# --- sharded over 2 gloo processes == in one process ------------------------------------------------------
METHODS = [("kd", {"temperature": 4.0}), ("fitnet", {"weight": 1.0}), ("pkt", {})]
RULES = ["mean", "confidence", "random"]


def _sharded_worker(rank, world, init, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    for rule in RULES:
        distiller, ensemble = _multi(METHODS, _teacher_models(3), rule, sharded=(rank, world))
        assert ensemble.local_ids == ([0, 2] if rank == 0 else [1])
        results = []
        for step in range(2):
            batch = _batch(5 + 2 * rank, seed=10 * step + rank)  # uneven batches per rank
            t_out = ensemble(batch.inputs)
            _, losses = distiller(batch, t_out)
            results.append({"losses": {k: v.detach() for k, v in losses.items()}, "logits": t_out.logits,
                            "features": [dict(o.features) for o in t_out.members]})
        torch.save(results, os.path.join(out_dir, f"{rule}-{rank}.pt"))
    dist.destroy_process_group()


def test_sharded_feature_ensemble_equals_in_process(tmp_path):
    mp.spawn(_sharded_worker, args=(2, f"file://{tmp_path}/pg", str(tmp_path)), nprocs=2, join=True)
    for rule in RULES:
        for rank in range(2):
            distiller, ensemble = _multi(METHODS, _teacher_models(3), rule)
            got = torch.load(tmp_path / f"{rule}-{rank}.pt", weights_only=True)
            for step in range(2):
                batch = _batch(5 + 2 * rank, seed=10 * step + rank)
                t_out = ensemble(batch.inputs)
                _, losses = distiller(batch, t_out)
                assert set(got[step]["losses"]) == set(losses) == {"ce", "kd", "fitnet", "pkt"}
                for key, value in losses.items():
                    assert torch.allclose(got[step]["losses"][key], value, atol=1e-6, rtol=0), (rule, rank, key)
                assert torch.allclose(got[step]["logits"], t_out.logits, atol=1e-6, rtol=0)
                for m, member in enumerate(t_out.members):
                    assert set(got[step]["features"][m]) == set(member.features)
                    for point, value in member.features.items():
                        assert torch.equal(got[step]["features"][m][point], value), (rule, rank, m, point)


# --- class order -------------------------------------------------------------------------------------------
PERM = [3, 0, 9, 1, 2, 8, 4, 6, 5, 7]  # output j of the permuted teacher is class PERM[j]


def _permuted(model):
    """The same network with its outputs in PERM order (fc rows permuted)."""
    other = create_model("digits_cnn", 10, width=16)
    state = model.state_dict()
    state["fc.weight"], state["fc.bias"] = state["fc.weight"][PERM], state["fc.bias"][PERM]
    other.load_state_dict(state)
    return other.eval()


def test_permuted_teacher_logits_match_after_mapping():
    dataset = [str(c) for c in range(10)]
    model = _teacher_models(1)[0]
    order = class_order([dataset[c] for c in PERM], dataset)
    plain, permuted = Teacher(model, ["stage1"]), Teacher(_permuted(model), ["stage1"], order)
    x = _inputs(6, 0)
    raw = permuted.model(x)
    assert not torch.allclose(raw, plain(x).logits)  # really permuted before mapping
    assert torch.allclose(permuted(x).logits, plain(x).logits, atol=1e-6, rtol=0)  # permuted GEMM rows: ulps
    assert torch.equal(permuted(x).features["stage1"], plain(x).features["stage1"])  # features untouched
    assert class_order(dataset, dataset) is None
    with pytest.raises(ClassOrderError, match=r"missing \['9'\], extra \['nine'\]"):
        class_order(dataset[:9] + ["nine"], dataset)


def _checkpoints(tmp_path):
    model = _teacher_models(1)[0]
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    torch.save(_permuted(model).state_dict(), tmp_path / "permuted.pt")
    return model


def _class_job(tmp_path, classes, **over):
    cfg = digits_job(tmp_path, scheme="multi_teacher", teachers=[
        {"model": "digits_cnn", "checkpoint": str(tmp_path / "plain.pt")},
        {"model": "digits_cnn", "checkpoint": str(tmp_path / "permuted.pt"), "classes": classes}], **over)
    cfg.pop("teacher")
    return cfg


def test_permuted_teacher_through_the_job(tmp_path):
    from kdray.orchestrator.api import preflight
    from kdray.orchestrator.build import build_teacher
    from kdray.orchestrator.placement import WorkerContext
    from kdray.orchestrator.plan import plan_stages

    model = _checkpoints(tmp_path)
    cfg = load_config(_class_job(tmp_path, [str(c) for c in PERM], methods=[{"name": "kd"}, {"name": "at"}]))
    preflight(cfg)
    stage = plan_stages(cfg)[-1]
    assert stage.row()["teachers"] == ["spec:teachers.0", "spec:teachers.1"]
    distiller = Distiller(_student(), [create_method("kd"), create_method("at")])
    ensemble = build_teacher(cfg, stage, distiller, 10, {}, WorkerContext(), classes=[str(c) for c in range(10)])
    x = _inputs(5, 2)
    out = ensemble(x)
    assert torch.allclose(out.members[1].logits, out.members[0].logits, atol=1e-6, rtol=0)
    assert torch.allclose(out.members[0].logits, model(x), atol=1e-6, rtol=0)
    assert distiller.term_teachers == [None, 0, 1]


@pytest.mark.parametrize("classes,pattern", [
    ([str(c) for c in range(9)] + ["nine"],
     r"^teachers\.1\.classes: missing \['9'\], extra \['nine'\] compared with dataset 'digits' \(10 classes: 0, 1, "
     r".*; list the teacher's outputs in its order using the dataset's class names"),
    ([str(c) for c in range(11)], r"^teachers\.1\.classes: extra \['10'\] compared with dataset 'digits'"),
])
def test_teacher_with_other_classes_is_a_one_line_error(tmp_path, classes, pattern):
    _checkpoints(tmp_path)
    with pytest.raises(ConfigError, match=pattern) as info:
        kdray.distill(_class_job(tmp_path, classes))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("teacher,pattern", [
    ({"model": "digits_cnn", "train": {}, "classes": ["0", "1"]}, r"teachers\.1: classes describes the output order"),
    ({"model": "digits_cnn", "checkpoint": "PLAIN", "classes": ["0", "0"]}, r"classes names \['0'\] more than once"),
])
def test_classes_config_errors(tmp_path, teacher, pattern):
    _checkpoints(tmp_path)
    if teacher.get("checkpoint") == "PLAIN":
        teacher["checkpoint"] = str(tmp_path / "plain.pt")
    cfg = digits_job(tmp_path, scheme="multi_teacher", teachers=[{"model": "digits_cnn", "train": {}}, teacher])
    cfg.pop("teacher")
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config(cfg)
    assert "\n" not in str(info.value)


# --- end to end -------------------------------------------------------------------------------------------
def test_multi_teacher_feature_job_trains_on_digits(tmp_path):
    teacher = {"train": {"epochs": 6, "lr": 0.1, "batch_size": 32}}
    cfg = digits_job(tmp_path, scheme="multi_teacher",
                     teachers=[{"model": "digits_cnn", "args": {"width": 12}, **teacher},
                               {"model": "digits_mlp", "args": {"hidden": 48}, **teacher}],
                     student={"model": "digits_mlp", "args": {"hidden": 32}},
                     methods=[{"name": "kd", "alpha": 0.9, "temperature": 4.0}, {"name": "fitnet", "weight": 1.0}],
                     ensemble={"combine": "mean"}, train={"epochs": 6, "lr": 0.1, "batch_size": 32})
    cfg.pop("teacher")
    seen = []

    class Record:
        def on_epoch_end(self, epoch, metrics, loop):
            if metrics["stage"] == "kd+fitnet-seed0":
                seen.append(metrics)

    result = kdray.distill(cfg, callbacks=[Record()])
    assert [s["kind"] for s in result.stages] == ["teacher", "teacher", "distill"]
    assert len(seen) == 6 and all("train_fitnet" in m and "train_kd" in m for m in seen)
    # each teacher's own (unweighted) FitNet loss is logged beside the weighted sum; mean rule: sum = avg
    last = seen[-1]
    assert last["train_fitnet"] == pytest.approx((last["train_fitnet_t0"] + last["train_fitnet_t1"]) / 2, rel=1e-5)
    assert seen[-1]["train_loss"] < seen[0]["train_loss"]
    assert result.accuracies("distill")[0] > 0.5  # chance is 0.1; measured 0.68 val top-1
