"""Yang, Martinez, Bulat, Tzimiropoulos, "Knowledge Distillation via Softmax Regression Representation
Learning" (ICLR 2021): SRRL."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method
from kdray.algorithms.feature.connectors import not_built, shape_error
from kdray.algorithms.feature.point_choice import pick_pair

SR_LOSSES = ("ce", "mse")


def last_linear(model: nn.Module) -> str | None:
    """The module path of the last ``nn.Linear`` in ``model`` (registration order): a classifier's head."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None


@register_method
class SRRL(KnowledgeTerm):
    """SRRL: the student's penultimate feature, through a connector, must work in the *teacher's* classifier.

    With ``h_S``, ``h_T`` the student's / teacher's penultimate features, ``r`` the connector (1x1 conv +
    BN + ReLU onto the teacher's width, the authors' ``transfer_conv``) and ``W_T`` a frozen copy of the
    teacher's classifier head::

        L = feature_weight * mean((r(h_S) - h_T)^2)                    (L_FM, feature matching)
          + sr_weight * L_SR(W_T r(h_S), W_T h_T)                      (softmax regression)

    ``sr_loss="mse"`` (default): the element mean of the squared difference of the two logit vectors, the
    "simple L2 loss" of the paper's abstract and what the authors' released code uses (``F.mse_loss``).
    ``sr_loss="ce"``: the softmax cross-entropy form, ``-sum_k softmax(W_T h_T)_k * log softmax(W_T r(h_S))_k``
    (batch mean), a variant the name "softmax regression" suggests. The target ``W_T h_T`` is the
    teacher's own logits when the embedding point is the head's input (it is recomputed through the head
    copy, so a class-reordered teacher changes nothing). The authors' code applies ``r`` to the last map
    before pooling and matches channel means (``statm_loss`` = the MSE of the pooled features); we apply
    it to the pooled embedding, as the paper writes ``r(h_S)``.

    The teacher's head: ``teacher_head`` is its module path in the teacher (``None``: the teacher's last
    ``nn.Linear``); the distiller hands the teacher network over before ``build``
    (:meth:`bind_teacher_model`), and a frozen copy (``requires_grad=False``, always ``eval``) is kept, so
    the teacher is never touched and no gradient reaches it; gradients of ``L_SR`` flow through the copy
    into ``r`` and the student. The head is applied to the flattened feature. A teacher known only by its
    outputs (a logit cache, a remote shard) has no head to copy: ``build`` then fails saying so.

    Points: one pair, the penultimate embedding (``feature_index=-1``). Defaults ``feature_weight=1``,
    ``sr_weight=1``: the authors' code (``loss_kd = L_FM + L_SR`` at ``--weight 1``).
    """

    name = "srrl"
    kind = "feature"
    paper = ("Yang, Martinez, Bulat, Tzimiropoulos 2021, Knowledge Distillation via Softmax Regression "
             "Representation Learning")
    default_student_points = "embedding"
    default_teacher_points = "embedding"

    def __init__(self, feature_weight: float = 1.0, sr_weight: float = 1.0, sr_loss: str = "mse",
                 teacher_head: str | None = None, feature_index: int = -1):
        super().__init__()
        if feature_weight < 0 or sr_weight < 0:
            raise ValueError(f"srrl.feature_weight and srrl.sr_weight must be >= 0, got {feature_weight} "
                             f"and {sr_weight}")
        if sr_loss not in SR_LOSSES:
            raise ValueError(f"srrl.sr_loss must be one of {SR_LOSSES}, got {sr_loss!r}")
        self.feature_weight = feature_weight
        self.sr_weight = sr_weight
        self.sr_loss = sr_loss
        self.teacher_head = teacher_head
        self.feature_index = feature_index
        self.connector: nn.Module | None = None
        self.head: nn.Module | None = None

    def bind_teacher_model(self, model: nn.Module | None) -> None:
        """Keep a frozen copy of the teacher's classifier head (called by ``Distiller.build``)."""
        if model is None:
            raise ValueError("srrl: needs the teacher's classifier head, but this teacher is known only by its "
                             "outputs (a logit cache or remote shard); use an in-process teacher")
        path = self.teacher_head or last_linear(model)
        modules = dict(model.named_modules())
        if path is None or path not in modules:
            linear = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
            raise ValueError(f"srrl.teacher_head={path!r} is not a module of the teacher; its linear layers: "
                             f"{linear}")
        head = copy.deepcopy(modules[path])
        for p in head.parameters():
            p.requires_grad_(False)
        self.head = head.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.head is not None:
            self.head.eval()
        return self

    def build(self, student: ModelOutput, teacher: ModelOutput, num_samples: int) -> None:
        if self.head is None:
            raise ValueError("srrl: no teacher head was bound before build (Distiller.build binds it from an "
                             "in-process teacher; call bind_teacher_model(teacher_model) when building by hand)")
        pair = pick_pair(self, student, teacher, self.feature_index)
        s_c, t_c = pair.student.shape[1], pair.teacher.shape[1]
        like = dict(device=pair.student.device, dtype=pair.student.dtype)
        self.connector = nn.Sequential(nn.Conv2d(s_c, t_c, 1, bias=False), nn.BatchNorm2d(t_c), nn.ReLU()).to(**like)
        nn.init.normal_(self.connector[0].weight, 0.0, (2.0 / t_c) ** 0.5)
        self.head = self.head.to(**like)
        s_raw, t_raw = student.features[pair.student_path], teacher.features[pair.teacher_path]
        try:
            logits = self.head(pair.teacher.flatten(1))
        except RuntimeError as err:
            raise shape_error(self.name, pair.student_path, s_raw, pair.teacher_path, t_raw,
                              f"the teacher's head does not take the teacher feature ({err})") from None
        if logits.shape != teacher.logits.shape:
            raise shape_error(self.name, pair.student_path, s_raw, pair.teacher_path, t_raw,
                              f"the teacher's head gives {tuple(logits.shape)} from it, not the logits' "
                              f"{tuple(teacher.logits.shape)}; point teacher_points / teacher_head at the "
                              f"classifier's input and the classifier")

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        if self.connector is None or self.head is None:
            raise not_built(self.name)
        pair = pick_pair(self, student, teacher, self.feature_index)
        s, t = pair.student, pair.teacher
        if s.shape[-2:] != t.shape[-2:]:
            raise shape_error(self.name, pair.student_path, student.features[pair.student_path], pair.teacher_path,
                              teacher.features[pair.teacher_path],
                              "SRRL matches penultimate features of the same spatial size (use embedding points)")
        r = self.connector(s)
        fm = F.mse_loss(r, t)
        z_s, z_t = self.head(r.flatten(1)), self.head(t.flatten(1))
        if self.sr_loss == "ce":
            sr = -(F.softmax(z_t, dim=1) * F.log_softmax(z_s, dim=1)).sum(dim=1).mean()
        else:
            sr = F.mse_loss(z_s, z_t)
        return {"srrl_fm": self.feature_weight * fm, "srrl_sr": self.sr_weight * sr}
