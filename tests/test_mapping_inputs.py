"""Batches whose inputs are a mapping of variable-length tensors (token ids + mask): padded per batch,
trained and evaluated by the same Distiller / TrainLoop as images, per-token labels ignored at -100."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from kdray.algorithms.distiller import Distiller, Teacher, hard_label_ce
from kdray.algorithms.engine import TrainLoop, evaluate
from kdray.data.collate import collate_batch
from kdray.algorithms.base import Batch, create_method


class BagOfTokens(nn.Module):
    """Masked mean of token embeddings -> classes: reads ``inputs["input_ids"]`` and the mask."""

    def __init__(self, vocab=20, dim=8, classes=3):
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, classes)

    def forward(self, input_ids, attention_mask):  # the distiller calls a model with a mapping's items as keywords
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.emb(input_ids) * mask).sum(1) / mask.sum(1)
        return self.head(pooled)


def samples(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 2 + i % 4
        ids = torch.randint(1, 20, (length,), generator=g)
        out.append(({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long)}, i % 3, i))
    return out


def test_collate_pads_to_the_longest_sample_of_the_batch():
    items = samples(3)  # lengths 2, 3, 4
    inputs, targets, indices = collate_batch(items)
    assert inputs["input_ids"].shape == (3, 4)
    assert inputs["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert inputs["input_ids"][0, 2:].tolist() == [0, 0]
    assert targets.tolist() == [0, 1, 2] and indices.tolist() == [0, 1, 2]
    token_targets = collate_batch([(x, torch.tensor([5] * len(x["input_ids"])), i) for x, _, i in items])[1]
    assert token_targets[0].tolist() == [5, 5, -100, -100]  # per-token labels pad with the ignore index


def test_image_samples_collate_as_before():
    items = [(torch.full((1, 2, 2), float(i)), i, i) for i in range(3)]
    x, y, idx = collate_batch(items)
    assert x.shape == (3, 1, 2, 2) and y.tolist() == [0, 1, 2] and idx.tolist() == [0, 1, 2]


def test_per_token_ce_ignores_minus_100_by_hand():
    logits = torch.zeros(1, 3, 2)
    logits[0, 0] = torch.tensor([math.log(3.0), 0.0])  # p(class 0) = 3/4
    targets = torch.tensor([[0, -100, 1]])  # token 2: uniform logits, p = 1/2
    expected = (-math.log(0.75) - math.log(0.5)) / 2
    assert abs(float(hard_label_ce(logits, targets)) - expected) < 1e-6
    assert float(hard_label_ce(logits, torch.full((1, 3), -100))) == 0.0  # no label at all: 0, not NaN


def test_distiller_and_loop_train_on_mapping_inputs():
    torch.manual_seed(0)
    teacher, student = Teacher(BagOfTokens()), BagOfTokens()
    distiller = Distiller(student, [create_method("kd", temperature=2.0)])
    loader = DataLoader(samples(), batch_size=4, collate_fn=collate_batch)
    example = next(iter(loader))[0]
    distiller.build(example, teacher)
    opt = torch.optim.SGD(distiller.parameters(), lr=0.5)
    loop = TrainLoop(distiller, teacher, opt, torch.optim.lr_scheduler.ConstantLR(opt, 1.0), loader, loader,
                     num_classes=3, epochs=1, device="cpu")
    before = [p.clone() for p in teacher.parameters()]
    raw = next(iter(loader))
    loss, losses = loop.step(Batch(*raw))
    assert set(losses) == {"ce", "kd"} and torch.isfinite(loss)
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))  # teacher never moves
    assert student.emb.weight.grad is not None and student.emb.weight.grad.abs().sum() > 0
    metrics = evaluate(student, loader, "cpu", num_classes=3)
    assert 0.0 <= metrics["top1"] <= 1.0 and math.isfinite(metrics["loss"])


def test_evaluate_counts_only_labelled_tokens():
    class Fixed(nn.Module):
        def forward(self, input_ids, attention_mask):  # (B, L, 2): always predicts class 1
            return F.one_hot(torch.ones_like(input_ids), 2).float() * 5

    ids = torch.tensor([1, 2, 3])
    items = [({"input_ids": ids, "attention_mask": torch.ones(3, dtype=torch.long)}, torch.tensor([1, 0, -100]), 0)]
    metrics = evaluate(Fixed(), DataLoader(items, batch_size=1, collate_fn=collate_batch), "cpu", num_classes=2)
    assert metrics["top1"] == 0.5  # 2 labelled tokens, one right; the -100 token is not counted


def test_kd_on_per_token_logits_averages_over_attended_tokens_only():
    torch.manual_seed(0)
    s, t = torch.randn(1, 3, 5), torch.randn(1, 3, 5)
    inputs = {"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 0]])}
    batch = Batch(inputs, torch.tensor([[2, -100, -100]]), torch.arange(1))
    kd = create_method("kd", alpha=0.5, temperature=2.0)
    from kdray.algorithms.base import ModelOutput

    out = kd(ModelOutput(s), ModelOutput(t), batch)
    p_t, log_p_s = F.softmax(t[0, :2] / 2, -1), F.log_softmax(s[0, :2] / 2, -1)
    by_hand = (p_t * (p_t.log() - log_p_s)).sum(-1).mean() * 4  # mean over the 2 attended tokens, T^2 = 4
    assert torch.allclose(out["kd"], 0.5 * by_hand, atol=1e-6)
    assert torch.allclose(out["ce"], 0.5 * F.cross_entropy(s[0, :1], torch.tensor([2])), atol=1e-6)
