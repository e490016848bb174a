"""Placement equivalence on 2 CPU processes (gloo): peer-parallel DML equals one-process DML, and a
teacher-sharded ensemble equals the one-process ensemble."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kdray.algorithms.base import Batch
from kdray.algorithms.distiller import Teacher
from kdray.algorithms.engine import seed_everything
from kdray.algorithms.schemes.multi_teacher import TeacherEnsemble
from kdray.algorithms.schemes.online import PeerCohort, PeerReplica
from kdray.models import create_model
from kdray.orchestrator.placement import ShardedTeacherEnsemble, gather_peer_logits

STEPS, TOL = 5, 1e-5


def _peer(k):
    seed_everything(100 + k)
    return create_model("digits_mlp", 10, hidden=16)


def _batches():
    g = torch.Generator().manual_seed(0)
    return [Batch(torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g), torch.arange(16))
            for _ in range(STEPS)]


def _train(module, batches, params):
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for batch in batches:
        _, losses = module(batch)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()


def _dml_single_process():
    cohort = PeerCohort([_peer(0), _peer(1)], "dml", weight=1.0, temperature=2.0)
    _train(cohort, _batches(), cohort.parameters())
    return [{k: v.clone() for k, v in p.state_dict().items()} for p in cohort.peers]


def _dml_worker(rank, world, init, out_dir):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    module = PeerReplica([_peer(0), _peer(1)], rank, gather_peer_logits, "dml", weight=1.0, temperature=2.0)
    module.build(_batches()[0].inputs)
    _train(module, _batches(), module.parameters())
    torch.save(module.peer.state_dict(), os.path.join(out_dir, f"peer{rank}.pt"))
    dist.destroy_process_group()


def _teachers():
    models = []
    for k, width in enumerate((8, 4, 6)):
        seed_everything(k)
        models.append(create_model("digits_cnn", 10, width=width).eval())
    return models


RULES = ["mean", "weights", "confidence", "random"]


def _ensemble_worker(rank, world, init, out_dir):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    for rule in RULES:
        sharded = ShardedTeacherEnsemble(_teachers(), rank, world, rule, weights=[0.5, 0.3, 0.2], seed=3)
        assert len(sharded.local) == (2 if rank == 0 else 1)  # teachers 0, 2 on rank 0; teacher 1 on rank 1
        x = torch.rand(7 + rank, 1, 8, 8, generator=torch.Generator().manual_seed(rank))  # uneven batches
        outs = [sharded(x).logits for _ in range(3)]
        torch.save(torch.stack(outs), os.path.join(out_dir, f"ens-{rule}-{rank}.pt"))
    dist.destroy_process_group()


def _spawn(fn, tmp_path, *args):
    init = f"file://{tmp_path}/pg"
    mp.spawn(fn, args=(2, init, str(tmp_path), *args), nprocs=2, join=True)


def test_peer_parallel_dml_equals_single_process(tmp_path):
    expected = _dml_single_process()
    _spawn(_dml_worker, tmp_path)
    for k in range(2):
        got = torch.load(tmp_path / f"peer{k}.pt", weights_only=True)
        for name, value in expected[k].items():
            assert torch.allclose(got[name], value, atol=TOL, rtol=0), (k, name)
    assert not torch.allclose(expected[0]["fc.weight"], _peer(0).state_dict()["fc.weight"])  # it trained


def test_sharded_ensemble_equals_single_process(tmp_path):
    _spawn(_ensemble_worker, tmp_path)
    for rule, rank in [(r, k) for r in RULES for k in range(2)]:
        local = TeacherEnsemble([Teacher(m) for m in _teachers()], rule, weights=[0.5, 0.3, 0.2], seed=3)
        x = torch.rand(7 + rank, 1, 8, 8, generator=torch.Generator().manual_seed(rank))
        if rule == "random":  # the same draws, in the same order, on every rank and in the reference
            local.generator.manual_seed(3)
        expected = torch.stack([local(x).logits for _ in range(3)])
        got = torch.load(tmp_path / f"ens-{rule}-{rank}.pt", weights_only=True)
        assert torch.allclose(got, expected, atol=1e-6), (rule, rank)


# --- K peers x D replicas, with a feature term exchanged between peers ---------------------------------
def _mlp_peer(k):
    seed_everything(200 + k)
    return create_model("digits_mlp", 10, hidden=(16, 24)[k])


def _fitnet():
    from kdray.algorithms.base import create_method

    return [create_method("fitnet", weight=1.0)]


def _grid_worker(rank, world, init, out_dir):
    from torch.nn.parallel import DistributedDataParallel

    from kdray.orchestrator.placement import PeerGrid

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    grid = PeerGrid(2, rank, world)
    module = PeerReplica([_mlp_peer(0), _mlp_peer(1)], grid.peer, grid.gather, "dml", 1.0, 2.0, _fitnet)
    module.build(_batches()[0].inputs, seed=5)
    ddp = DistributedDataParallel(module, process_group=grid.peer_group, find_unused_parameters=True)
    _train(ddp, [_shard(b, grid.replica) for b in _batches()], module.parameters())
    torch.save(module.learner.state_dict(), os.path.join(out_dir, f"grid-peer{grid.peer}-rep{grid.replica}.pt"))
    dist.destroy_process_group()


def _shard(batch, d):
    half = slice(8 * d, 8 * d + 8)  # replica d reads shard d of each global batch
    return Batch(batch.inputs[half], batch.targets[half], batch.indices[half])


def test_peers_replicated_with_feature_exchange_equal_single_process(tmp_path):
    """2 peers x 2 replicas on 4 gloo ranks, DML + FitNet between peers of different widths, equals one
    process that runs the cohort on each half-batch and averages the two gradients (what DDP computes)."""
    cohort = PeerCohort([_mlp_peer(0), _mlp_peer(1)], "dml", 1.0, 2.0, make_terms=_fitnet)
    cohort.build(_batches()[0].inputs, seed=5)
    connector_shapes = [tuple(p.shape) for p in cohort.learners[0].links["1"].parameters()]
    assert (24, 16, 1, 1) in connector_shapes  # peer 0 (16 wide) regresses onto peer 1's 24-wide features
    opt = torch.optim.SGD(cohort.parameters(), lr=0.1, momentum=0.9)
    for batch in _batches():
        opt.zero_grad()
        for d in range(2):
            _, losses = cohort(_shard(batch, d))
            (sum(losses.values()) / 2).backward()
        opt.step()
    mp.spawn(_grid_worker, args=(4, f"file://{tmp_path}/pg", str(tmp_path)), nprocs=4, join=True)
    for k in range(2):
        expected = dict(cohort.learners[k].named_parameters())
        for replica in range(2):
            got = torch.load(tmp_path / f"grid-peer{k}-rep{replica}.pt", weights_only=True)
            assert set(expected) <= set(got)
            for name, value in expected.items():
                assert torch.allclose(got[name], value, atol=TOL, rtol=0), (k, replica, name)
    fresh = _mlp_peer(0).state_dict()["fc.weight"]
    assert not torch.allclose(cohort.learners[0].peer.state_dict()["fc.weight"], fresh)  # it trained


# --- a peer-parallel stage checkpoints mid-way (every rank's state) and resumes to the same result -----
class _RankZeroFile:
    """Checkpoints as Ray Train keeps them: rank 0 writes, every rank reads the latest one."""

    def __init__(self, path, rank):
        self.path, self.rank = path, rank

    def latest(self):
        return torch.load(self.path, weights_only=True) if os.path.exists(self.path) else None

    def save(self, payload, metrics):
        from kdray.orchestrator.checkpoints import save_atomic

        if self.rank == 0:
            save_atomic(payload, self.path)
        dist.barrier()


class _Interrupt(Exception):
    pass


class _StopAfter:
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, epoch, metrics, loop):
        if epoch == self.epoch:
            raise _Interrupt


def _online_job_worker(rank, world, init, out_dir, label, stop_after):
    from kdray.config import load_config
    from kdray.orchestrator.job import run_job
    from kdray.orchestrator.placement import WorkerContext

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    mlp = lambda h: {"model": "digits_mlp", "args": {"hidden": h}}  # noqa: E731
    cfg = load_config({"scheme": "online", "student": mlp(8), "online": {"peers": [mlp(16), mlp(24)]},
                       "methods": [{"name": "pkt", "weight": 1.0}], "baseline": False,
                       "data": {"options": {"train_fraction": 0.2}}, "train": {"epochs": 4, "batch_size": 32},
                       "checkpoint": {"every_epochs": 2}, "ray": {"num_workers": 2}, "mlflow": {"enabled": False}})
    ctx = WorkerContext(rank=rank, world_size=world, checkpoints=_RankZeroFile(os.path.join(out_dir, label), rank),
                        log=lambda _: None, callbacks=[_StopAfter(stop_after)] if stop_after is not None else [])
    try:
        results = run_job(cfg, ctx)
        if rank == 0:
            torch.save(torch.tensor(results[-1]["peer_test_top1"]), os.path.join(out_dir, f"{label}.acc"))
    except _Interrupt:
        pass
    dist.barrier()
    os._exit(0)  # like a killed worker: no process-group teardown (gloo may abort in it after an interrupted loop)


def test_peer_parallel_stage_resumes_from_a_mid_stage_checkpoint(tmp_path):
    run = lambda label, stop, n: mp.spawn(_online_job_worker,  # noqa: E731
                                          args=(2, f"file://{tmp_path}/pg{n}", str(tmp_path), label, stop),
                                          nprocs=2, join=True)
    run("whole", None, 0)
    run("cut", 2, 1)  # stops in epoch 3, after the checkpoint at the end of epoch 2
    saved = torch.load(tmp_path / "cut", weights_only=True)
    assert int(saved["loop"]["ranks"][1]["epoch"]) == 2 and len(saved["loop"]["ranks"]) == 2
    assert not (tmp_path / "cut.acc").exists()
    run("cut", None, 2)  # resumed at epoch 2 on both ranks
    whole, resumed = (torch.load(tmp_path / f"{x}.acc", weights_only=True) for x in ("whole", "cut"))
    assert torch.equal(whole, resumed), (whole, resumed)
