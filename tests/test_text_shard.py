"""Two text teachers sharded over 2 gloo ranks (``ensemble.shard: true``) equal the unsharded ensemble.

Each rank's batch is a mapping (input_ids, attention_mask, token_type_ids) padded to its *own* length (5 on
rank 0, 9 on rank 1; 3 and 4 rows). The sharded ensemble pads both to 9, runs each teacher on its host and
cuts every rank's outputs back to that rank's length. The reference is what ``ensemble.shard: false`` computes
on that rank: every teacher in one :class:`TeacherEnsemble` on the rank's own batch. Compared: the combined
logits, each teacher's logits and every requested feature (hidden states ``(B, L, H)``, attention maps
``(B, heads, L, L)``, queries, the pooled embedding), with their shapes, and a Distiller's losses with
per-teacher TinyBERT connectors plus KD. Tolerance 1e-5 (fp32; longer padding changes only the size of the
matmuls, the masked keys get weight exactly 0; the measured maximum is printed on failure).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("transformers")

from kdray.algorithms import create_method  # noqa: E402
from kdray.algorithms.base import Batch  # noqa: E402
from kdray.algorithms.distiller import Distiller, Teacher  # noqa: E402
from kdray.algorithms.schemes.multi_teacher import TeacherEnsemble  # noqa: E402
from kdray.models.text import text_model  # noqa: E402
from kdray.orchestrator.placement import (LengthLayout, ShardedTeacherEnsemble, gather_inputs,  # noqa: E402
                                          sequence_length)

TOL = 1e-5
VOCAB, CLASSES = 40, 3
POINTS = ["hidden_states.1", "attentions.0", "queries.1", "embedding"]
LENGTHS = {0: [4, 2, 5], 1: [9, 3, 7, 1]}  # rank -> real lengths of its rows (padded to 5 and to 9)


def _teachers():
    """Two random-weight BERTs of different depth and width (attention maps need eager attention: built so)."""
    models = []
    for seed, (layers, hidden) in ((1, (2, 16)), (2, (3, 24))):
        torch.manual_seed(seed)
        model = text_model(CLASSES, layers=layers, hidden=hidden, heads=2, intermediate=32, vocab=VOCAB).eval()
        with torch.no_grad():  # BERT's 0.02-std init gives logits ~1e-2: scale the head so they are O(1)
            model.hf.classifier.weight.mul_(100.0)
        models.append(model)
    return models


def _student():
    torch.manual_seed(5)
    return text_model(CLASSES, layers=2, hidden=16, heads=2, intermediate=32, vocab=VOCAB)


def rank_batch(rank: int) -> Batch:
    """Rank ``rank``'s batch as the collate function pads it: ids then 0, mask 1 then 0."""
    lengths = LENGTHS[rank]
    g = torch.Generator().manual_seed(100 + rank)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[row, :n] = 1
    inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return Batch(inputs, torch.arange(len(lengths)) % CLASSES, torch.arange(len(lengths)))


def _distiller(sharded=None):
    """(distiller, ensemble): KD on the combined logits + TinyBERT per teacher (one connector each)."""
    models = _teachers()
    distiller = Distiller(_student(), [create_method("kd", temperature=2.0),
                                       create_method("tinybert", prediction_weight=0.0)], num_teachers=2)
    teachers = [Teacher(m, distiller.resolve_teacher_points(m, member=i)) for i, m in enumerate(models)]
    ensemble = (TeacherEnsemble(teachers, "confidence") if sharded is None
                else ShardedTeacherEnsemble(teachers, *sharded, rule="confidence"))
    return distiller, ensemble


def _outputs(ensemble, distiller, batch: Batch) -> dict:
    out = ensemble(batch.inputs)
    _, losses = distiller(batch, out)
    return {"logits": out.logits,
            "members": [{"logits": m.logits, **m.features} for m in out.members],
            "losses": {k: v.detach() for k, v in losses.items()}}


def _worker(rank, world, init, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        plain = ShardedTeacherEnsemble([Teacher(m, POINTS) for m in _teachers()], rank, world, rule="mean")
        batch = rank_batch(rank)
        first = plain(batch.inputs)
        second = plain(rank_batch(1 - rank).inputs)  # the lengths swap ranks: the learnt layout follows
        distiller, ensemble = _distiller((rank, world))
        torch.manual_seed(9)  # connectors: the same init in every process
        distiller.build(batch.inputs, ensemble)
        result = {"first": {"logits": first.logits,
                            "members": [{"logits": m.logits, **m.features} for m in first.members]},
                  "second_logits": second.logits,
                  "distill": _outputs(ensemble, distiller, batch)}
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _diff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("shard")
    # fork: the workers inherit the imported torch / transformers (spawn re-imports them: ~10 s each here)
    mp.start_processes(_worker, args=(2, f"file://{out}/pg", str(out)), nprocs=2, join=True, start_method="fork")
    return {r: torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)}


def test_sharded_text_teachers_equal_unsharded_ensemble(sharded):
    models = _teachers()
    plain = TeacherEnsemble([Teacher(m, POINTS) for m in models], "mean")
    for rank in (0, 1):
        batch = rank_batch(rank)
        length = batch.inputs["input_ids"].shape[1]
        expected = plain(batch.inputs)
        got = sharded[rank]["first"]
        assert _diff(got["logits"], expected.logits) <= TOL
        for m, member in enumerate(expected.members):
            assert set(got["members"][m]) == {"logits", *POINTS}
            for name, value in {"logits": member.logits, **member.features}.items():
                d = _diff(got["members"][m][name], value)
                assert d <= TOL, f"rank {rank}, teacher {m}, {name}: max difference {d:.2e} > {TOL:.0e}"
        rows, heads = len(LENGTHS[rank]), 2
        assert got["members"][1]["hidden_states.1"].shape == (rows, length, 24)  # cut back to this rank's length
        assert got["members"][0]["attentions.0"].shape == (rows, heads, length, length)
        assert got["members"][1]["embedding"].shape == (rows, 24)
        # the second call had the other rank's batch (and length): the layout is not frozen at the first length
        assert _diff(sharded[rank]["second_logits"], plain(rank_batch(1 - rank).inputs).logits) <= TOL
    # the teachers differ, so a rank that received the wrong teacher's slice would fail above
    with torch.no_grad():
        a, b = (m(rank_batch(0).inputs) for m in models)
    assert _diff(a, b) > 0.1


def test_distiller_losses_with_sharded_text_teachers_equal_unsharded(sharded):
    for rank in (0, 1):
        distiller, ensemble = _distiller()
        batch = rank_batch(rank)
        torch.manual_seed(9)
        distiller.build(batch.inputs, ensemble)
        expected = _outputs(ensemble, distiller, batch)
        got = sharded[rank]["distill"]
        assert set(got["losses"]) == set(expected["losses"]) >= {"kd", "tinybert_hidden", "tinybert_attention"}
        for name, value in expected["losses"].items():
            d = _diff(got["losses"][name], value)
            assert d <= TOL * max(1.0, float(value.abs())), f"rank {rank}, loss {name}: difference {d:.2e}"
        assert _diff(got["logits"], expected["logits"]) <= TOL


def test_mapping_without_attention_mask_or_with_two_lengths_is_one_line():
    inputs = {"input_ids": torch.ones(2, 3, dtype=torch.long)}
    assert sequence_length(inputs) == 3 and sequence_length(torch.ones(2, 3)) == 0
    with pytest.raises(ValueError, match=r"unless the inputs carry an attention_mask; add one .* ensemble.shard: "
                                         r"false"):
        gather_inputs(inputs, [2, 2], 5, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"different sequence lengths \{'input_ids': 3, 'attention_mask': 4\}"):
        sequence_length({**inputs, "attention_mask": torch.ones(2, 4)})


@pytest.mark.parametrize("length", [16, 1])
def test_sequence_dims_are_learnt_by_shape_not_by_size(length):
    """The first teacher's hidden size is 16: at length 16 every sequence-sized dim is also hidden-sized, and
    only the probe at another length tells them apart; length 1 probes at 2 (padded, mask 0)."""
    teacher = Teacher(_teachers()[0], POINTS)
    ids = torch.randint(1, VOCAB, (2, length), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    layout = LengthLayout.learn(teacher, teacher(inputs), inputs, length)
    dims = dict(zip([name for name, _, _ in layout.layout.entries], layout.seq_dims))
    assert dims == {"logits": (), "hidden_states.1": (0,), "attentions.0": (1, 2), "queries.1": (0,),
                    "embedding": ()}
    assert dict((n, s) for n, s, _ in layout.at(7).entries)["attentions.0"] == (2, 7, 7)
