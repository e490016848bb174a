"""A tiny transformer encoder that follows kdray's text feature-point contract, for the text terms' tests.

No transformers dependency: the taps are identity modules, so kdray's ``FeatureTap`` reads them by module path
exactly as it will read the Hugging Face models' taps:

- ``hidden_states.{i}`` (B, L, H), ``i = 0..num_layers`` (0 = embedding output, i = output of layer i);
- ``attentions.{i}`` (B, heads, L, L): softmax attention probabilities of layer ``i`` (0-based);
- ``queries.{i}`` / ``keys.{i}`` / ``values.{i}`` (B, L, H): layer ``i``'s projections before the head split;
- ``embedding`` (B, H): the masked mean of the last hidden states (sentence embedding).

It is called as ``model(input_ids=..., attention_mask=...)``; the logits are a linear head on ``embedding``.
Helpers build a (distiller, teacher, batch) pair on it and run the gradient / short-training checks every
image method gets from ``tests/method_harness.py``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.algorithms import create_method
from kdray.algorithms.base import Batch
from kdray.algorithms.distiller import Distiller, Teacher

VOCAB = 50


class TinyLayer(nn.Module):
    """Post-LN BERT layer: multi-head self-attention, residual + LayerNorm, GELU FFN, residual + LayerNorm."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(hidden, hidden) for _ in range(3))
        self.out = nn.Linear(hidden, hidden)
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape
        return x.view(b, n, self.heads, h // self.heads).transpose(1, 2)

    def forward(self, x, mask, taps):
        q, k, v = taps["queries"](self.q(x)), taps["keys"](self.k(x)), taps["values"](self.v(x))
        qh, kh, vh = self.split(q), self.split(k), self.split(v)
        scores = qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1])
        scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
        probs = taps["attentions"](scores.softmax(-1))
        context = (probs @ vh).transpose(1, 2).reshape(x.shape)
        x = self.ln1(x + self.out(context))
        return self.ln2(x + self.ffn(x))


class TinyEncoder(nn.Module):
    """Token + position embeddings, ``num_layers`` post-LN layers, mean pooling, a classification head."""

    def __init__(self, num_layers: int = 2, hidden_size: int = 16, num_attention_heads: int = 2,
                 num_classes: int = 3, vocab_size: int = VOCAB, max_length: int = 16):
        super().__init__()
        self.num_layers, self.hidden_size, self.num_attention_heads = num_layers, hidden_size, num_attention_heads
        self.tokens, self.positions = nn.Embedding(vocab_size, hidden_size), nn.Embedding(max_length, hidden_size)
        self.ln = nn.LayerNorm(hidden_size)
        self.layers = nn.ModuleList(TinyLayer(hidden_size, num_attention_heads) for _ in range(num_layers))
        self.hidden_states = nn.ModuleList(nn.Identity() for _ in range(num_layers + 1))
        for tap in ("attentions", "queries", "keys", "values"):
            setattr(self, tap, nn.ModuleList(nn.Identity() for _ in range(num_layers)))
        self.embedding = nn.Identity()
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.hidden_states[0](self.ln(self.tokens(input_ids) + self.positions(pos)))
        for i, layer in enumerate(self.layers):
            taps = {name: getattr(self, name)[i] for name in ("attentions", "queries", "keys", "values")}
            x = self.hidden_states[i + 1](layer(x, mask, taps))
        weights = mask.to(x.dtype).unsqueeze(-1)
        pooled = self.embedding((x * weights).sum(1) / weights.sum(1).clamp_min(1.0))
        return self.head(pooled)


def text_batch(batch_size: int = 4, length: int = 8, seed: int = 0) -> Batch:
    """Random token ids with right padding (row ``b`` keeps ``length - b`` tokens) and random labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch_size, length), generator=g)
    mask = torch.ones(batch_size, length, dtype=torch.long)
    for b in range(batch_size):
        mask[b, length - min(b, length - 2):] = 0
    ids = ids * mask
    return Batch({"input_ids": ids, "attention_mask": mask}, torch.randint(0, 3, (batch_size,), generator=g),
                 torch.arange(batch_size))


def make_text_pair(method: str, student: dict | None = None, teacher: dict | None = None, **params):
    """(distiller, teacher, batch): a 2-layer student (hidden 16) of a 4-layer teacher (hidden 24), built."""
    torch.manual_seed(0)
    s_model = TinyEncoder(**{"num_layers": 2, "hidden_size": 16, **(student or {})})
    t_model = TinyEncoder(**{"num_layers": 4, "hidden_size": 24, **(teacher or {})})
    distiller = Distiller(s_model, [create_method(method, **params)])
    t = Teacher(t_model, distiller.resolve_teacher_points(t_model))
    batch = text_batch()
    distiller.build(batch.inputs, t)
    return distiller, t, batch


def assert_gradients_reach_student_only(method: str, **params) -> None:
    """The term's losses give every trainable student parameter on the path a gradient (the head through the
    logits for response parts), its connectors a gradient, and the teacher none."""
    distiller, teacher, batch = make_text_pair(method, **params)
    with torch.no_grad():
        t_out = teacher(batch.inputs)
    _, losses = distiller(batch, t_out)
    sum(losses.values()).backward()
    grads = [p.grad for p in distiller.student.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert grads, f"{method}: no gradient reached the student"
    for name, p in distiller.terms.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{method}: connector {name} got no gradient"
    assert all(p.grad is None for p in teacher.parameters()), f"{method}: the teacher got a gradient"


def short_text_training(method: str, steps: int = 30, **params) -> list[float]:
    """Adam on one fixed batch: the term's own loss (excluding the CE) at each step."""
    distiller, teacher, batch = make_text_pair(method, **params)
    opt = torch.optim.Adam(distiller.parameters(), lr=1e-2)
    with torch.no_grad():
        t_out = teacher(batch.inputs)
    values = []
    for _ in range(steps):
        _, losses = distiller(batch, t_out)
        values.append(float(sum(v.detach() for k, v in losses.items() if k != "ce")))
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    return values


def kl_rows(p_t: torch.Tensor, p_s: torch.Tensor) -> torch.Tensor:
    """``sum_j p_t log(p_t / p_s)`` per row with ``0 log 0 = 0`` (reference for the hand-derived checks)."""
    return torch.where(p_t > 0, p_t * (p_t.clamp_min(1e-30).log() - p_s.clamp_min(1e-30).log()), 0.0).sum(-1)


def soft_ce(student_logits, teacher_logits, temperature=1.0):
    return -(F.softmax(teacher_logits / temperature, -1) * F.log_softmax(student_logits / temperature, -1)).sum(-1)
