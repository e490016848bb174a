"""Knowledge terms that communicate use the process group they are handed, and a split run equals one process.

CRD's memory banks (and its partition-function estimate ``Z``) must cover the batch the one-process run sees.
Peer-parallel online training puts other peers on the other ranks of the world: gathering there (the old
behaviour) wrote peer 1's embeddings into rank 0's banks. Checked on gloo CPU processes, without Ray:
2 peers on 2 ranks, 2 peers x 2 replicas on 4 ranks, and an offline data-parallel distiller on 2 ranks;
then (``ray`` mark) that the Ray Train runner hands an offline distiller's CRD the world.
"""
import inspect
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from kdray.algorithms.base import Batch, KnowledgeTerm, create_method, list_methods
from kdray.algorithms.distiller import Distiller, Teacher
from kdray.algorithms.engine import seed_everything
from kdray.algorithms.schemes.online import PeerCohort, PeerReplica
from kdray.models import create_model
from kdray.orchestrator.placement import PeerGrid

N, B, STEPS, NCE_K, SEED, TOL = 32, 16, 4, 6, 5, 1e-5
BUFFERS = ("bank_s", "bank_t", "z")


def _peer(k):
    seed_everything(300 + k)
    return create_model("digits_mlp", 10, hidden=(16, 24)[k])


def _negatives(pos):
    """Negatives fixed by the positives, so every placement contrasts the same bank rows."""
    return (pos[:, None] + 1 + torch.arange(NCE_K, device=pos.device)) % N


def _crd():
    term = create_method("crd", weight=1.0, feat_dim=8, nce_k=NCE_K, temperature=0.5, momentum=0.5)
    term.sample_negatives = _negatives
    return [term]


def _batches():
    """STEPS global batches of B distinct samples of an N-sample dataset (each step its own order)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(N, 1, 8, 8, generator=g), torch.randint(0, 10, (N,), generator=g)
    out = []
    for _ in range(STEPS):
        idx = torch.randperm(N, generator=g)[:B]
        out.append(Batch(x[idx], y[idx], idx))
    return out


def _shard(batch, d, shards):
    """Replica ``d``'s rows of a global batch, interleaved as DistributedSampler deals them."""
    return Batch(batch.inputs[d::shards], batch.targets[d::shards], batch.indices[d::shards])


def _train(module, batches, params, loss_key):
    """SGD steps; returns the named loss of every step."""
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    seen = []
    for batch in batches:
        _, losses = module(batch)
        seen.append(losses[loss_key].item())
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    return seen


def _cohort():
    """The one-process reference: both peers, the whole global batch each step."""
    cohort = PeerCohort([_peer(0), _peer(1)], "dml", 1.0, 2.0, make_terms=_crd)
    cohort.build(_batches()[0].inputs, N, seed=SEED)
    opt = torch.optim.SGD(cohort.parameters(), lr=0.1, momentum=0.9)
    losses = {k: [] for k in range(2)}
    for batch in _batches():
        _, out = cohort(batch)
        for k in range(2):
            losses[k].append(out[f"peer{k}_crd"].item())
        opt.zero_grad()
        sum(out.values()).backward()
        opt.step()
    return cohort, losses


def _peer_worker(rank, world, init, out_dir):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    grid = PeerGrid(2, rank, world)
    module = PeerReplica([_peer(0), _peer(1)], grid.peer, grid.gather, "dml", 1.0, 2.0, _crd)
    module.build(_batches()[0].inputs, N, seed=SEED)
    grid.hand_term_group(module)  # what the online stage runner does
    trainable = module
    if grid.replicas > 1:
        trainable = DistributedDataParallel(module, process_group=grid.peer_group)
    losses = _train(trainable, [_shard(b, grid.replica, grid.replicas) for b in _batches()],
                    module.parameters(), f"peer{grid.peer}_crd")
    torch.save({"state": module.learner.state_dict(), "losses": losses},
               os.path.join(out_dir, f"peer{grid.peer}-rep{grid.replica}.pt"))
    dist.destroy_process_group()


def _run_peers(tmp_path, world):
    mp.spawn(_peer_worker, args=(world, f"file://{tmp_path}/pg", str(tmp_path)), nprocs=world, join=True)


def _check_peers_equal_cohort(tmp_path, replicas):
    cohort, expected_losses = _cohort()
    for k in range(2):
        expected = cohort.learners[k].state_dict()
        term = cohort.learners[k].links[str(1 - k)][0]
        assert torch.allclose(term.bank_s.norm(dim=1)[_batches()[0].indices], torch.ones(B))  # it updated
        runs = [torch.load(tmp_path / f"peer{k}-rep{d}.pt", weights_only=True) for d in range(replicas)]
        for d, run in enumerate(runs):
            got = run["state"]
            assert set(got) == set(expected)
            for name in [n for n in expected if n.rsplit(".", 1)[-1] in BUFFERS]:  # banks and Z first
                assert torch.allclose(got[name], expected[name], atol=TOL, rtol=0), (k, d, name)
            for name, value in expected.items():
                assert torch.allclose(got[name], value, atol=TOL, rtol=0), (k, d, name)
        # each replica's loss is the mean over its half of the batch: their mean is the full batch's
        got_losses = torch.tensor([run["losses"] for run in runs]).mean(0)
        assert torch.allclose(got_losses, torch.tensor(expected_losses[k]), atol=TOL, rtol=0), k


def test_crd_between_two_peers_on_two_ranks_equals_one_process(tmp_path):
    """The issue's bug: each rank's banks hold its own peer's (and its partner's) embeddings, not peer 1's."""
    _run_peers(tmp_path, 2)
    _check_peers_equal_cohort(tmp_path, replicas=1)


def test_crd_between_peers_in_a_two_by_two_grid_gathers_over_the_peers_replicas(tmp_path):
    """2 peers x 2 replicas on 4 ranks: each replica reads half of the global batch; the banks gather the
    two halves in the peer's group (its replicas), and equal one process with the whole batch."""
    _run_peers(tmp_path, 4)
    _check_peers_equal_cohort(tmp_path, replicas=2)


# --- offline, data-parallel: each rank half the batch, the world is the group --------------------------------
def _distiller():
    seed_everything(7)
    teacher_model = create_model("digits_mlp", 10, hidden=24)
    seed_everything(8)
    distiller = Distiller(create_model("digits_mlp", 10, hidden=16), _crd())
    teacher = Teacher(teacher_model, distiller.resolve_teacher_points(teacher_model))
    distiller.build(_batches()[0].inputs, teacher, N)
    return distiller, teacher


def _offline(distiller, teacher):
    return lambda batch: distiller(batch, teacher(batch.inputs))


def _offline_worker(rank, world, init, out_dir):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    distiller, teacher = _distiller()
    distiller.set_process_group(dist.group.WORLD)  # what the Ray Train runner's DDP wrap hands it
    ddp = DistributedDataParallel(distiller)
    losses = _train(lambda b: ddp(b, teacher(b.inputs)), [_shard(b, rank, world) for b in _batches()],
                    distiller.parameters(), "crd")
    torch.save({"state": distiller.state_dict(), "losses": losses}, os.path.join(out_dir, f"offline{rank}.pt"))
    dist.destroy_process_group()


def test_offline_data_parallel_crd_banks_equal_one_process_with_the_whole_batch(tmp_path):
    distiller, teacher = _distiller()
    expected_losses = _train(_offline(distiller, teacher), _batches(), distiller.parameters(), "crd")
    expected = distiller.state_dict()
    mp.spawn(_offline_worker, args=(2, f"file://{tmp_path}/pg", str(tmp_path)), nprocs=2, join=True)
    runs = [torch.load(tmp_path / f"offline{r}.pt", weights_only=True) for r in range(2)]
    for r, run in enumerate(runs):
        for name, value in expected.items():
            assert torch.allclose(run["state"][name], value, atol=TOL, rtol=0), (r, name)
    got_losses = torch.tensor([run["losses"] for run in runs]).mean(0)
    assert torch.allclose(got_losses, torch.tensor(expected_losses), atol=TOL, rtol=0)
    assert not torch.allclose(expected["terms.0.bank_s"], _distiller()[0].state_dict()["terms.0.bank_s"])


def test_terms_that_import_torch_distributed_take_their_process_group():
    """A term using collectives must override ``set_process_group`` (and so use only the group handed in)."""
    for name, cls in list_methods().items():
        if "torch.distributed" in inspect.getsource(inspect.getmodule(cls)):
            assert cls.set_process_group is not KnowledgeTerm.set_process_group, name


# --- the Ray Train runner hands the world to an offline distiller's terms -------------------------------------
class _BankProbe:
    """Epoch callback run in each Ray Train worker: saves its rank's CRD buffers after each student epoch."""

    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_epoch_end(self, epoch, metrics, loop):
        from kdray.algorithms.relation.crd import CRD

        if metrics.get("kind") == "teacher":
            return
        crd = next(m for m in loop.distiller.modules() if isinstance(m, CRD))
        torch.save({b: getattr(crd, b).detach().cpu() for b in BUFFERS},
                   os.path.join(self.out_dir, f"ray-bank-{dist.get_rank()}.pt"))


@pytest.mark.ray
def test_offline_crd_on_two_ray_train_workers_updates_every_bank_row_on_every_rank(tmp_path, ray_session):
    """One epoch visits every training sample once over the two workers: with the world handed to CRD, each
    rank's banks hold every sample's (unit-norm) update and both ranks' banks are equal."""
    import sys

    from ray import cloudpickle

    from jobs import digits_job
    from kdray.config import load_config
    from kdray.orchestrator.ray_runner import run_on_ray

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    cfg = load_config(digits_job(tmp_path, name="crd2", ray__num_workers=2, teacher__train__epochs=1,
                                 train__epochs=1, methods=[{"name": "crd", "feat_dim": 8, "nce_k": 16}]))
    run_on_ray(cfg, None, {}, epoch_callbacks=[_BankProbe(str(tmp_path))], quiet=True)
    banks = [torch.load(tmp_path / f"ray-bank-{r}.pt", weights_only=True) for r in range(2)]
    for name in BUFFERS:
        assert torch.allclose(banks[0][name], banks[1][name], atol=1e-6), name
    for name in ("bank_s", "bank_t"):
        norms = banks[0][name].norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5), (name, int((norms - 1).abs().gt(1e-5).sum()))
