"""Sanh, Debut, Chaumond, Wolf, "DistilBERT, a distilled version of BERT" (NeurIPS EMC^2 workshop 2019)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdray.algorithms.base import Batch, ModelOutput, register_method
from kdray.algorithms.response.kd import kl_div_with_temperature
from kdray.algorithms.text.contract import Geometry, TextTerm, check_pair, hidden_state, token_mask

IGNORE_INDEX = -100  # transformers' label for tokens that carry no MLM target


@register_method
class DistilBERT(TextTerm):
    """DistilBERT's triple loss: ``alpha_ce * L_ce + alpha_mlm * L_mlm + alpha_cos * L_cos``.

    - ``L_ce``: ``T^2 * KL(softmax(t / T) || softmax(s / T))`` on the logits, ``batchmean`` (the paper's soft
      targets; its code's ``KLDivLoss(batchmean) * T^2``). For masked-LM logits (B, L, V) it is taken over the
      positions that have an MLM target (``targets != -100``), as the paper's code selects them.
    - ``L_mlm``: cross-entropy with the hard targets: the task's labels (B,) or MLM labels (B, L) with ``-100``
      ignored. This *is* the distiller's CE (``provides_ce``), weighted ``alpha_mlm``, returned as ``ce``.
    - ``L_cos``: ``mean(1 - cos(h_s, h_t))`` over the real (non-padding) tokens of the *last* hidden states
      (``hidden_states.{M}`` vs ``hidden_states.{N}``), the code's ``CosineEmbeddingLoss`` with target 1.
      DistilBERT keeps the teacher's hidden size, so a narrower student is refused (use ``tinybert``, which
      learns a projection).

    Defaults are the paper's code (``train.py``): ``temperature=2``, ``alpha_ce=5``, ``alpha_mlm=2``,
    ``alpha_cos=1``. Its every-other-layer student initialisation belongs to the model builder, not here.
    """

    name = "distilbert"
    kind = "feature"
    paper = "Sanh, Debut, Chaumond, Wolf 2019, DistilBERT, a distilled version of BERT"
    provides_ce = True

    def __init__(self, temperature: float = 2.0, alpha_ce: float = 5.0, alpha_mlm: float = 2.0,
                 alpha_cos: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"distilbert.temperature must be > 0, got {temperature}")
        if min(alpha_ce, alpha_mlm, alpha_cos) < 0:
            raise ValueError(f"distilbert.alpha_ce / alpha_mlm / alpha_cos must be >= 0, got "
                             f"{alpha_ce}, {alpha_mlm}, {alpha_cos}")
        self.temperature = temperature
        self.alpha_ce, self.alpha_mlm, self.alpha_cos = alpha_ce, alpha_mlm, alpha_cos

    def points(self, side: str, student: Geometry, teacher: Geometry | None) -> list[str]:
        if side == "student":
            return [hidden_state(student.num_layers)]
        if self.alpha_cos and teacher.hidden_size != student.hidden_size:
            raise ValueError(f"distilbert: the cosine loss needs equal hidden sizes, but the student has "
                             f"{student.hidden_size} and the teacher {teacher.hidden_size}; use tinybert "
                             f"(learned projection) for a narrower student, or alpha_cos=0")
        return [hidden_state(teacher.num_layers)]

    def build(self, student: ModelOutput, teacher: ModelOutput, num_samples: int) -> None:
        self.geometries()

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        s_geom, t_geom = self.geometries()
        sp, tp = hidden_state(s_geom.num_layers), hidden_state(t_geom.num_layers)
        h_s, h_t = check_pair(self.name, sp, student.features[sp], tp, teacher.features[tp])
        s_logits, t_logits, targets = student.logits, teacher.logits, batch.targets
        if s_logits.dim() == 3:  # masked LM: (B, L, V) logits and (B, L) labels
            s_logits, t_logits, targets = s_logits.flatten(0, 1), t_logits.flatten(0, 1), targets.flatten()
            keep = targets != IGNORE_INDEX
            s_soft, t_soft = s_logits[keep], t_logits[keep]
        else:
            s_soft, t_soft = s_logits, t_logits
        losses = {"ce": self.alpha_mlm * F.cross_entropy(s_logits, targets, ignore_index=IGNORE_INDEX),
                  "distilbert_soft": self.alpha_ce * kl_div_with_temperature(s_soft, t_soft, self.temperature)}
        if self.alpha_cos:
            mask = token_mask(batch, h_s, self.name)
            losses["distilbert_cos"] = self.alpha_cos * (1.0 - F.cosine_similarity(h_s[mask], h_t[mask], -1).mean())
        return losses
