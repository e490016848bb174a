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


def _dml_single_process():
    cohort = PeerCohort([_peer(0), _peer(1)], "dml", weight=1.0, temperature=2.0)
    opt = torch.optim.SGD(cohort.parameters(), lr=0.1, momentum=0.9)
    for batch in _batches():
        _, losses = cohort(batch)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    return [{k: v.clone() for k, v in p.state_dict().items()} for p in cohort.peers]


def _dml_worker(rank, world, init, out_dir):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    module = PeerReplica(_peer(rank), rank, gather_peer_logits, "dml", weight=1.0, temperature=2.0)
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    for batch in _batches():
        _, losses = module(batch)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
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
