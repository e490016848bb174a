"""Sun, Cheng, Gan, Liu, "Patient Knowledge Distillation for BERT Model Compression" (EMNLP 2019)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdray.algorithms.base import Batch, ModelOutput, register_method
from kdray.algorithms.text.contract import Geometry, LayerMapError, TextTerm, check_layer, check_pair, hidden_state

STRATEGIES = ("skip", "last")


def pkd_layer_map(strategy: str, student_layers: int, teacher_layers: int) -> dict[int, int]:
    """Student layer ``j`` -> teacher layer for ``j = 1..M-1`` (the last layer is left to the soft targets).

    ``skip`` (PKD-Skip): every ``N / M``-th teacher layer, ``floor(j N / M)`` (12 -> 6: 2, 4, 6, 8, 10);
    ``last`` (PKD-Last): the ``M - 1`` teacher layers below the last, ``N - M + j`` (12 -> 6: 7, 8, 9, 10, 11).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"bert_pkd.strategy must be one of {STRATEGIES}, got {strategy!r}")
    if student_layers < 2 or teacher_layers < student_layers:
        raise LayerMapError(f"bert_pkd: PKD-{strategy} maps the student's layers 1..M-1 into a deeper teacher; got "
                            f"a {student_layers}-layer student and a {teacher_layers}-layer teacher (give layer_map)")
    if strategy == "skip":
        return {j: j * teacher_layers // student_layers for j in range(1, student_layers)}
    return {j: teacher_layers - student_layers + j for j in range(1, student_layers)}


@register_method
class BertPKD(TextTerm):
    """Patient KD's ``L_PT``: the student's intermediate [CLS] states match the teacher's mapped layers.

    ``L_PT = beta * mean_{i, j} || h_s^{i,j} / ||h_s^{i,j}|| - h_t^{i,I(j)} / ||h_t^{i,I(j)}|| ||^2`` where
    ``h^{i,j}`` is the [CLS] (token 0) state of sample ``i`` after layer ``j``. The paper sums over samples and
    layers; kdray follows its code (``patience_loss`` with ``normalize_patience``: ``mse_loss`` of the
    normalised vectors), a mean over samples, mapped layers *and hidden units*, the scale its ``beta`` was
    tuned at. The paper searches ``beta`` in {10, 100, 500, 1000}; default 100.

    Layer map: ``strategy="skip"`` (PKD-Skip, the paper's better variant, default) or ``"last"`` (PKD-Last),
    see :func:`pkd_layer_map`; or ``layer_map={student_layer: teacher_layer}`` (1-based). The paper's full
    objective adds ``(1 - alpha) CE + alpha L_DS`` (soft targets at temperature ``T``): add a ``kd`` term.
    Normalised vectors are compared directly, so student and teacher share the hidden size (BERT-6 of BERT-12).
    """

    name = "bert_pkd"
    kind = "feature"
    paper = "Sun, Cheng, Gan, Liu 2019, Patient Knowledge Distillation for BERT Model Compression"

    def __init__(self, beta: float = 100.0, strategy: str = "skip", layer_map: dict[int, int] | None = None):
        super().__init__()
        if beta < 0:
            raise ValueError(f"bert_pkd.beta must be >= 0, got {beta}")
        if strategy not in STRATEGIES:
            raise ValueError(f"bert_pkd.strategy must be one of {STRATEGIES}, got {strategy!r}")
        if layer_map is not None and not layer_map:
            raise ValueError("bert_pkd.layer_map is empty; give {student_layer: teacher_layer} pairs or leave it unset")
        self.beta = beta
        self.strategy = strategy
        self.layer_map = {int(k): int(v) for k, v in layer_map.items()} if layer_map else None
        self.pairs: dict[int, int] = {}

    def points(self, side: str, student: Geometry, teacher: Geometry | None) -> list[str]:
        if side == "student":
            if self.layer_map is not None:
                for j in self.layer_map:
                    check_layer(self.name, "layer_map", j, student, "student")
                return [hidden_state(j) for j in self.layer_map]
            if student.num_layers < 2:
                raise LayerMapError(f"bert_pkd: a {student.num_layers}-layer student has no intermediate layer; "
                                    f"give layer_map")
            return [hidden_state(j) for j in range(1, student.num_layers)]
        if teacher.hidden_size != student.hidden_size:
            raise ValueError(f"bert_pkd compares normalised [CLS] states, so hidden sizes must match: student "
                             f"{student.hidden_size}, teacher {teacher.hidden_size}")
        if self.layer_map is not None:
            self.pairs = {j: check_layer(self.name, "layer_map", i, teacher, "teacher")
                          for j, i in self.layer_map.items()}
        else:
            self.pairs = pkd_layer_map(self.strategy, student.num_layers, teacher.num_layers)
        return [hidden_state(i) for i in self.pairs.values()]

    def build(self, student: ModelOutput, teacher: ModelOutput, num_samples: int) -> None:
        self.geometries()

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        self.geometries()
        s_cls, t_cls = [], []
        for j, i in self.pairs.items():
            sp, tp = hidden_state(j), hidden_state(i)
            h_s, h_t = check_pair(self.name, sp, student.features[sp], tp, teacher.features[tp])
            s_cls.append(h_s[:, 0])
            t_cls.append(h_t[:, 0])
        s = F.normalize(torch.stack(s_cls, 1), dim=-1)
        t = F.normalize(torch.stack(t_cls, 1), dim=-1)
        return {"bert_pkd": self.beta * F.mse_loss(s, t)}
