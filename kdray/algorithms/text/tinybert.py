"""Jiao et al., "TinyBERT: Distilling BERT for Natural Language Understanding" (Findings of EMNLP 2020)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.algorithms.base import Batch, ModelOutput, register_method
from kdray.algorithms.text.contract import (Geometry, LayerMapError, TextTerm, attention_point, check_layer,
                                            check_pair, hidden_state, split_heads, token_mask)


def uniform_layer_map(student_layers: int, teacher_layers: int) -> dict[int, int]:
    """The paper's uniform strategy ``g(m) = m N / M`` for ``m = 1..M`` (4 <- 12: 3, 6, 9, 12), floored."""
    return {m: m * teacher_layers // student_layers for m in range(1, student_layers + 1)}


def attention_scores(queries: torch.Tensor, keys: torch.Tensor, heads: int, term: str, paths) -> torch.Tensor:
    """Pre-softmax scores ``Q_h K_h^T / sqrt(d_head)`` (B, heads, L, L) from a layer's Q / K projections."""
    q = split_heads(queries, heads, term, paths[0])
    k = split_heads(keys, heads, term, paths[1])
    return q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])


def masked_mse(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of ``(a - b)^2`` over the entries where ``keep`` (broadcast to ``a``) is true."""
    keep = keep.expand_as(a)
    return ((a - b) ** 2)[keep].mean()


@register_method
class TinyBERT(TextTerm):
    """TinyBERT's transformer-layer distillation: ``sum_m L_layer(S_m, T_g(m))``.

    - ``m = 0``, embedding: ``MSE(E_s W_e, E_t)`` with a learned ``W_e`` (``hidden_states.0``), weight
      ``embedding_weight``.
    - ``m = 1..M``, each mapped layer: attention ``1/h sum_heads MSE(A_s, A_t)`` on the *pre-softmax* scores
      ``A = Q K^T / sqrt(d_head)`` (the paper's choice: the unnormalised scores converge faster than the
      probabilities), computed here from the layer's ``queries`` / ``keys`` taps, since the contract's
      ``attentions`` are probabilities; plus hidden state ``MSE(H_s W_h, H_t)`` with one learned ``W_h`` shared
      by all layers (paper eq. 8; the official code also shares it with the embedding, kdray keeps ``W_e``
      separate as paper eq. 9 writes it).
    - ``m = M + 1``, prediction layer: soft cross-entropy ``-softmax(z_t / t) . log_softmax(z_s / t)``, summed
      over classes and averaged over the batch (the official code's ``.mean()`` also divides by the classes),
      weight ``prediction_weight``, ``temperature=1`` as the paper.

    Padding is excluded: MSEs are means over real tokens (attention: over query *and* key both real); the
    official code averages over every position after zeroing masked scores. Heads must match (the paper's
    ``1/h sum_heads``). Layer map ``{student layer m: teacher layer g(m)}`` (1-based), default uniform
    :func:`uniform_layer_map`. The paper runs general distillation (``prediction_weight=0``), then task
    distillation of the intermediate layers, then of the prediction layer: phases are separate stages in
    kdray. No hard-label CE (``ce_weight=0``, as the paper).
    """

    name = "tinybert"
    kind = "feature"
    paper = "Jiao et al. 2020, TinyBERT: Distilling BERT for Natural Language Understanding"
    provides_ce = True

    def __init__(self, layer_map: dict[int, int] | None = None, embedding_weight: float = 1.0,
                 hidden_weight: float = 1.0, attention_weight: float = 1.0, prediction_weight: float = 1.0,
                 temperature: float = 1.0, ce_weight: float = 0.0):
        super().__init__()
        weights = dict(embedding_weight=embedding_weight, hidden_weight=hidden_weight,
                       attention_weight=attention_weight, prediction_weight=prediction_weight, ce_weight=ce_weight)
        bad = {k: v for k, v in weights.items() if v < 0}
        if bad:
            raise ValueError(f"tinybert weights must be >= 0, got {bad}")
        if temperature <= 0:
            raise ValueError(f"tinybert.temperature must be > 0, got {temperature}")
        if layer_map is not None and not layer_map:
            raise ValueError("tinybert.layer_map is empty; give {student_layer: teacher_layer} pairs or leave it unset")
        self.layer_map = {int(k): int(v) for k, v in layer_map.items()} if layer_map else None
        self.embedding_weight, self.hidden_weight = embedding_weight, hidden_weight
        self.attention_weight, self.prediction_weight = attention_weight, prediction_weight
        self.temperature, self.ce_weight = temperature, ce_weight
        self.pairs: dict[int, int] = {}
        self.embedding_projection: nn.Module | None = None
        self.hidden_projection: nn.Module | None = None

    def _layers(self, student: Geometry) -> list[int]:
        if self.layer_map is None:
            return list(range(1, student.num_layers + 1))
        return [check_layer(self.name, "layer_map", m, student, "student") for m in self.layer_map]

    def points(self, side: str, student: Geometry, teacher: Geometry | None) -> list[str]:
        if side == "student":
            layers = self._layers(student)
        else:
            if teacher.num_attention_heads != student.num_attention_heads and self.attention_weight:
                raise LayerMapError(f"tinybert: attention-score MSE needs equal head counts, but the student has "
                                    f"{student.num_attention_heads} heads and the teacher {teacher.num_attention_heads}"
                                    f"; use minilmv2 (re-split relation heads) or attention_weight=0")
            if self.layer_map is not None:
                self.pairs = {m: check_layer(self.name, "layer_map", n, teacher, "teacher")
                              for m, n in self.layer_map.items()}
            elif student.num_layers > teacher.num_layers:
                raise LayerMapError(f"tinybert: the uniform map g(m) = m N / M needs a student no deeper than the "
                                    f"teacher, got {student.num_layers} > {teacher.num_layers} layers; give layer_map")
            else:
                self.pairs = uniform_layer_map(student.num_layers, teacher.num_layers)
            layers = list(self.pairs.values())
        points = [hidden_state(0)] + [hidden_state(m) for m in layers]
        for m in layers:
            points += [attention_point("queries", m), attention_point("keys", m)]
        return points

    def build(self, student: ModelOutput, teacher: ModelOutput, num_samples: int) -> None:
        s_geom, t_geom = self.geometries()
        ref = student.features[hidden_state(0)]
        self.embedding_projection = nn.Linear(s_geom.hidden_size, t_geom.hidden_size).to(ref.device, ref.dtype)
        self.hidden_projection = nn.Linear(s_geom.hidden_size, t_geom.hidden_size).to(ref.device, ref.dtype)

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        s_geom, t_geom = self.geometries()
        if self.embedding_projection is None:
            raise RuntimeError("tinybert: build() was not called (the distiller builds terms before training)")
        e_s, e_t = check_pair(self.name, hidden_state(0), student.features[hidden_state(0)], hidden_state(0),
                              teacher.features[hidden_state(0)])
        mask = token_mask(batch, e_s, self.name)
        tokens = mask.unsqueeze(-1)
        real_pairs = mask[:, None, :, None] & mask[:, None, None, :]
        hidden = e_s.new_zeros(())
        attention = e_s.new_zeros(())
        for m, n in self.pairs.items():
            h_s, h_t = check_pair(self.name, hidden_state(m), student.features[hidden_state(m)], hidden_state(n),
                                  teacher.features[hidden_state(n)])
            hidden = hidden + masked_mse(self.hidden_projection(h_s), h_t, tokens)
            if self.attention_weight:
                sq, sk = attention_point("queries", m), attention_point("keys", m)
                tq, tk = attention_point("queries", n), attention_point("keys", n)
                a_s = attention_scores(student.features[sq], student.features[sk], s_geom.num_attention_heads,
                                       self.name, (sq, sk))
                a_t = attention_scores(teacher.features[tq], teacher.features[tk], t_geom.num_attention_heads,
                                       self.name, (tq, tk))
                attention = attention + masked_mse(a_s, a_t, real_pairs)
        losses = {"tinybert_embedding": self.embedding_weight * masked_mse(self.embedding_projection(e_s), e_t, tokens),
                  "tinybert_hidden": self.hidden_weight * hidden,
                  "tinybert_attention": self.attention_weight * attention}
        if self.prediction_weight:
            t = self.temperature
            soft = -(F.softmax(teacher.logits / t, -1) * F.log_softmax(student.logits / t, -1)).sum(-1).mean()
            losses["tinybert_prediction"] = self.prediction_weight * soft
        if self.ce_weight:
            losses["ce"] = self.ce_weight * F.cross_entropy(student.logits, batch.targets)
        return losses
