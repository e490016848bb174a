"""Sharded LM teachers and a DDP / FSDP2 student on 2 gloo CPU ranks equal one process on the global batch.

The reference is written from the algorithms alone (each teacher's log-softmax, combine_teacher_logits,
token_distill_loss on the whole batch, SGD), not from kdray.orchestrator.lm_placement, so a placement bug
(wrong rows, wrong teacher, a token mean per rank instead of over all ranks) shows as a mismatch.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from kdray.algorithms.lm.multi_teacher import combine_teacher_logits
from kdray.algorithms.lm.token_loss import next_token_mask, token_distill_loss
from kdray.models.causal_lm import tiny_causal_lm
from kdray.orchestrator.lm_ray import LMPlacementJob, lm_train_worker

VOCAB, LENGTH, STEPS = 23, 12, 4
COMBINED_TOL, WEIGHT_TOL = 1e-6, 1e-5  # fp32; measured max differences are printed by the assertions


def _job(**kw) -> LMPlacementJob:
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(STEPS):
        ids = torch.randint(0, VOCAB, (6, LENGTH), generator=g)
        mask = torch.zeros(6, LENGTH, dtype=torch.long)
        for row, prompt in enumerate((2, 3, 5, 7, 4, 9)):  # uneven completion lengths: ranks keep unequal counts
            mask[row, prompt:] = 1
        batches.append((ids, mask))
    return LMPlacementJob(
        student=functools.partial(tiny_causal_lm, VOCAB, layers=2, width=16, heads=2, max_length=LENGTH, seed=7),
        teachers=[functools.partial(tiny_causal_lm, VOCAB, layers=2, width=24, heads=2, max_length=LENGTH, seed=s)
                  for s in (1, 2)],
        batches=batches, **kw)


def one_process(job: LMPlacementJob) -> tuple[dict, torch.Tensor]:
    """The student trained on the global batches against the teachers combined in one process."""
    student, teachers = job.student(), [build().eval() for build in job.teachers]
    if job.teacher_dtype is not None:
        teachers = [t.to(job.teacher_dtype) for t in teachers]
    optimizer = torch.optim.SGD(student.parameters(), lr=job.lr, momentum=job.momentum)
    first = None
    for ids, mask in job.batches:
        with torch.no_grad():
            members = [F.log_softmax(t(ids).float(), dim=-1) for t in teachers]
        combined = combine_teacher_logits(members, job.rule, job.weights)[0]
        first = combined if first is None else first
        loss = token_distill_loss(student(ids)[:, :-1], combined[:, :-1], next_token_mask(mask), job.divergence,
                                  job.temperature)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return student.state_dict(), first


def _worker(rank, world, init, out, job):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    result = lm_train_worker(job, rank, world)
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


def _spawn(tmp_path, job, tag="r") -> dict:
    out = tmp_path / f"{tag}.pt"
    mp.spawn(_worker, args=(2, f"file://{tmp_path}/pg-{tag}", str(out), job), nprocs=2, join=True)
    return torch.load(out, weights_only=True)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def assert_same_student(got: dict, expected: dict, tol: float = WEIGHT_TOL) -> None:
    diff = _max_diff(got, expected)
    assert diff <= tol, f"max weight difference {diff:.2e} > {tol:.0e}"
    init = _job().student().state_dict()
    assert _max_diff(expected, init) > 1e-3, "the student did not train"


@pytest.mark.parametrize("rule", ["mean", "confidence"])
def test_sharded_teachers_and_ddp_student_equal_one_process(tmp_path, rule):
    job = _job(rule=rule)
    got = _spawn(tmp_path, job)
    expected_state, expected_combined = one_process(job)
    diff = float((got["combined"] - expected_combined).abs().max())
    assert diff <= COMBINED_TOL, f"combined teacher log-probs differ by {diff:.2e}"
    # the two teachers really differ, so a rank that used only its own teacher would fail above
    with torch.no_grad():
        a, b = (F.log_softmax(build()(job.batches[0][0]), -1) for build in job.teachers)
    assert float((a - b).abs().max()) > 0.1
    assert_same_student(got["state"], expected_state)


def test_fsdp_student_with_bf16_teachers_equals_one_process(tmp_path):
    job = _job(student_sharding="fsdp", teacher_dtype=torch.bfloat16)
    got = _spawn(tmp_path, job)
    expected_state, _ = one_process(job)
    assert_same_student(got["state"], expected_state)


def test_fsdp_checkpoint_resume_equals_uninterrupted(tmp_path):
    path = str(tmp_path / "ckpt" / "student.pt")
    first = _spawn(tmp_path, _job(student_sharding="fsdp", checkpoint_path=path, checkpoint_every=1, stop_after=2),
                   "first")
    assert first["start"] == 0 and len(first["losses"]) == 2
    saved = torch.load(path, weights_only=True)  # written whole by rank 0: loads without the process group
    assert saved["step"] == 2 and _max_diff(saved["model"], first["state"]) == 0.0
    momentum = saved["optimizer"]["state"]  # the optimizer's momentum, gathered whole as the weights are
    assert len(momentum) == len(saved["model"]) and all("momentum_buffer" in v for v in momentum.values())
    resumed = _spawn(tmp_path, _job(student_sharding="fsdp", checkpoint_path=path), "resumed")
    assert resumed["start"] == 2 and len(resumed["losses"]) == STEPS - 2
    expected_state, _ = one_process(_job())
    assert_same_student(resumed["state"], expected_state)
