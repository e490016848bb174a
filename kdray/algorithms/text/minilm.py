"""Wang, Wei, Dong, Bao, Yang, Zhou, "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of
Pre-Trained Transformers" (NeurIPS 2020)."""
from __future__ import annotations

import torch

from kdray.algorithms.base import Batch, ModelOutput, register_method
from kdray.algorithms.text.contract import (Geometry, LayerMapError, TextTerm, attention_point, check_pair,
                                            masked_row_kl, relation_log_probs, split_heads, token_mask)


@register_method
class MiniLM(TextTerm):
    """MiniLM's deep self-attention distillation of the *last* layers: ``L_AT + L_VR``.

    - ``L_AT = 1 / (A_h |x|) sum_a sum_t KL(A^T_{N,a,t} || A^S_{M,a,t})``: the attention distributions
      (``attentions.{N-1}`` vs ``attentions.{M-1}``, softmax probabilities), per head ``a`` and query token ``t``.
    - ``L_VR``, same average of ``KL(VR^T || VR^S)`` with the value relation
      ``VR_a = softmax(V_a V_a^T / sqrt(d_k))`` from the last layer's ``values`` split into its heads.

    Only the last layer is matched, so depths need no map and hidden sizes may differ (the relation is
    ``L x L``), but the head counts must agree (the paper's requirement; MiniLMv2 lifts it). The average runs
    over real query tokens of the batch (padded queries excluded, padded keys have probability 0 in both).
    Weights ``attention_weight = value_weight = 1`` (the paper sums the two). The teacher-assistant variant is
    two stages (teacher -> assistant -> student), kdray's ``takd`` scheme.
    """

    name = "minilm"
    kind = "relation"
    paper = "Wang et al. 2020, MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression"

    def __init__(self, attention_weight: float = 1.0, value_weight: float = 1.0):
        super().__init__()
        if attention_weight < 0 or value_weight < 0:
            raise ValueError(f"minilm weights must be >= 0, got {attention_weight} and {value_weight}")
        self.attention_weight, self.value_weight = attention_weight, value_weight

    def points(self, side: str, student: Geometry, teacher: Geometry | None) -> list[str]:
        if side == "teacher" and teacher.num_attention_heads != student.num_attention_heads:
            raise LayerMapError(f"minilm transfers attention per head, so head counts must match: student "
                                f"{student.num_attention_heads}, teacher {teacher.num_attention_heads}; use minilmv2 "
                                f"(num_relation_heads) for different head counts")
        layers = (student if side == "student" else teacher).num_layers
        return [attention_point("attentions", layers), attention_point("values", layers)]

    def build(self, student: ModelOutput, teacher: ModelOutput, num_samples: int) -> None:
        self.geometries()

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        s_geom, t_geom = self.geometries()
        sa, sv = attention_point("attentions", s_geom.num_layers), attention_point("values", s_geom.num_layers)
        ta, tv = attention_point("attentions", t_geom.num_layers), attention_point("values", t_geom.num_layers)
        a_s, a_t = check_pair(self.name, sa, student.features[sa], ta, teacher.features[ta], dims=4)
        check_pair(self.name, sv, student.features[sv], tv, teacher.features[tv])
        v_s = split_heads(student.features[sv], s_geom.num_attention_heads, self.name, sv)
        v_t = split_heads(teacher.features[tv], t_geom.num_attention_heads, self.name, tv)
        mask = token_mask(batch, student.features[sv], self.name)
        rows = mask[:, None, :]  # (B, 1, L): real query tokens, every head
        tiny = torch.finfo(a_s.dtype).tiny
        attention = masked_row_kl(a_t, a_s.clamp_min(tiny).log(), rows)
        value = masked_row_kl(relation_log_probs(v_t, mask).exp(), relation_log_probs(v_s, mask), rows)
        return {"minilm_attention": self.attention_weight * attention, "minilm_value": self.value_weight * value}
