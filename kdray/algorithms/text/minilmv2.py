"""Wang, Bao, Huang, Dong, Wei, "MiniLMv2: Multi-Head Self-Attention Relation Distillation for Compressing
Pretrained Transformers" (Findings of ACL 2021)."""
from __future__ import annotations

import torch

from kdray.algorithms.base import Batch, ModelOutput, register_method
from kdray.algorithms.text.contract import (Geometry, LayerMapError, TextTerm, attention_point, check_layer, check_pair,
                                            masked_row_kl, relation_log_probs, split_heads, token_mask)

RELATIONS = ("queries", "keys", "values")


@register_method
class MiniLMv2(TextTerm):
    """MiniLMv2: ``L = sum_{r in QQ, KK, VV} 1 / (A_r |x|) sum_a sum_t KL(R^T_{r,a,t} || R^S_{r,a,t})``.

    For each of a layer's queries, keys and values (B, L, H, before the head split), the heads are concatenated
    and *re-split* into ``num_relation_heads`` relation heads of ``H / A_r`` units, and each relation head gives
    ``R = softmax(X_a X_a^T / sqrt(d_r))`` (L x L). Student and teacher use the same ``A_r``, so their
    attention head counts and hidden sizes may differ (``A_r`` must divide both hidden sizes).

    Layers: the student's last layer learns from ``teacher_layer`` (1-based, default the teacher's last). The
    paper uses the last layer for base-size teachers and an upper-middle layer for large (24-layer) teachers,
    which it found better than the last; set ``teacher_layer`` for those. ``num_relation_heads`` default 48
    (the paper's choice for base-size teachers; 64 for large ones). Relations are weighted equally; the average
    runs over relation heads and real query tokens of the batch.
    """

    name = "minilmv2"
    kind = "relation"
    paper = "Wang, Bao, Huang, Dong, Wei 2021, MiniLMv2: Multi-Head Self-Attention Relation Distillation"

    def __init__(self, num_relation_heads: int = 48, teacher_layer: int | None = None, weight: float = 1.0):
        super().__init__()
        if num_relation_heads < 1:
            raise ValueError(f"minilmv2.num_relation_heads must be >= 1, got {num_relation_heads}")
        if weight < 0:
            raise ValueError(f"minilmv2.weight must be >= 0, got {weight}")
        self.num_relation_heads, self.teacher_layer, self.weight = num_relation_heads, teacher_layer, weight
        self.layers: tuple[int, int] | None = None

    def points(self, side: str, student: Geometry, teacher: Geometry | None) -> list[str]:
        geom = student if side == "student" else teacher
        if geom.hidden_size % self.num_relation_heads:
            raise LayerMapError(f"minilmv2.num_relation_heads={self.num_relation_heads} must divide the {side}'s "
                                f"hidden size {geom.hidden_size}")
        if side == "student":
            layer = student.num_layers
        elif self.teacher_layer is None:
            layer = teacher.num_layers
        else:
            layer = check_layer(self.name, "teacher_layer", self.teacher_layer, teacher, "teacher")
        if side == "teacher":
            self.layers = (student.num_layers, layer)
        return [attention_point(r, layer) for r in RELATIONS]

    def build(self, student: ModelOutput, teacher: ModelOutput, num_samples: int) -> None:
        self.geometries()

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        self.geometries()
        s_layer, t_layer = self.layers
        losses = {}
        for relation in RELATIONS:
            sp, tp = attention_point(relation, s_layer), attention_point(relation, t_layer)
            check_pair(self.name, sp, student.features[sp], tp, teacher.features[tp])
            x_s = split_heads(student.features[sp], self.num_relation_heads, self.name, sp)
            x_t = split_heads(teacher.features[tp], self.num_relation_heads, self.name, tp)
            mask = token_mask(batch, student.features[sp], self.name)
            kl = masked_row_kl(relation_log_probs(x_t, mask).exp(), relation_log_probs(x_s, mask), mask[:, None, :])
            losses[f"minilmv2_{relation[0] * 2}"] = self.weight * kl
        return losses
