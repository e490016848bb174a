"""Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.algorithms.base import Batch, ModelOutput, register_method
from kdray.algorithms.feature.connectors import PhasedTerm, as_map, not_built, shape_error


@register_method
class FitNet(PhasedTerm):
    """FitNets hint learning: a regressor maps the student's *guided* layer onto the teacher's *hint*.

    ``L_HT = weight * mean((u_h(x) - r(v_g(x)))^2)`` where ``u_h`` is the teacher's hint feature,
    ``v_g`` the student's guided feature and ``r`` the regressor.

    Points: the model stages; the hint / guided layers are the *middle* stage of each network
    (``(n - 1) // 2``: the paper's choice, and RepDistiller's ``hint_layer=2`` on the CIFAR zoo), or
    ``hint_index`` to pick another (it indexes both point lists).

    Regressor (as in the paper): a convolution whose kernel is ``(H_g - H_h + 1, W_g - W_h + 1)``
    so that its valid output has the hint's spatial size, followed by BN and *the hint's
    non-linearity*: a ReLU when the teacher's hint is non-negative on the build batch (a post-ReLU
    point), none otherwise. The paper's regressor cannot enlarge a map; when the guided map is an
    integer factor ``k`` smaller than the hint (ShuffleNet students of ResNet / WRN teachers at the
    middle stage), a ``2k x 2k`` stride-``k`` transposed convolution upsamples it (RepDistiller's
    choice for ``k = 2``); other mismatches raise a ``ValueError`` naming both shapes and paths.
    RepDistiller uses a stride-2 3x3 conv where the guided map is twice the hint's size and always
    appends BN + ReLU.

    Reduction: the paper writes ``1/2 ||u_h - r(v_g)||^2``; we take the element mean without the
    1/2 (RepDistiller / mdistiller's ``MSELoss``), the quantity their published weight is tuned for.
    During hint pre-training a constant factor only rescales the step size.

    Phases: the paper trains in two stages: (1) hints only, student up to the guided layer;
    (2) the whole student with KD. ``hint_epochs > 0`` runs stage 1 for the first ``hint_epochs``
    epochs of the same run (``set_epoch``): :meth:`uses_hard_labels` is then ``False`` so the
    distiller drops the hard-label CE and only the hint trains. Afterwards the hint keeps being
    applied next to the CE (``keep_hint=True``, the single-stage RepDistiller/mdistiller protocol,
    which ``hint_epochs=0`` gives from the start) or is dropped (``keep_hint=False``; add a ``kd``
    term for the paper's stage 2 - note a KD term adds its own CE also during stage 1).

    Default ``weight=100``: the RepDistiller / mdistiller CIFAR-100 weight (``-b 100``, FEAT_WEIGHT 100).
    """

    name = "fitnet"
    kind = "feature"
    paper = "Romero, Ballas, Kahou, Chassang, Gatta, Bengio 2015, FitNets: Hints for Thin Deep Nets"
    default_student_points = "stages"
    default_teacher_points = "stages"

    def __init__(self, weight: float = 100.0, hint_index: int | None = None, hint_epochs: int = 0,
                 keep_hint: bool = True):
        super().__init__()
        if weight < 0:
            raise ValueError(f"fitnet.weight must be >= 0, got {weight}")
        if hint_epochs < 0:
            raise ValueError(f"fitnet.hint_epochs must be >= 0, got {hint_epochs}")
        if hint_epochs == 0 and not keep_hint:
            raise ValueError("fitnet: keep_hint=False with hint_epochs=0 would never apply the hint")
        self.weight = weight
        self.hint_index = hint_index
        self.hint_epochs = hint_epochs
        self.keep_hint = keep_hint
        self.regressor: nn.Module | None = None

    # --- phases -----------------------------------------------------------------------------
    def in_hint_pretraining(self) -> bool:
        return self.epoch < self.hint_epochs

    def uses_hard_labels(self) -> bool:
        return not self.in_hint_pretraining()

    def _active(self) -> bool:
        return self.in_hint_pretraining() or self.keep_hint

    # --- points -----------------------------------------------------------------------------
    def hint_paths(self) -> tuple[str, str]:
        """(guided student path, hint teacher path)."""
        s_points, t_points = list(self.student_points), list(self.teacher_points)
        if not s_points or not t_points:
            raise ValueError(f"fitnet: needs student and teacher feature points, got {s_points} and {t_points}")
        if self.hint_index is None:
            return s_points[(len(s_points) - 1) // 2], t_points[(len(t_points) - 1) // 2]
        try:
            return s_points[self.hint_index], t_points[self.hint_index]
        except IndexError:
            raise ValueError(f"fitnet.hint_index={self.hint_index} is out of range for student points "
                             f"{s_points} and teacher points {t_points}") from None

    def _maps(self, student: ModelOutput, teacher: ModelOutput):
        sp, tp = self.hint_paths()
        s_raw, t_raw = student.features[sp], teacher.features[tp]
        s, t = as_map(s_raw), as_map(t_raw)
        if s is None or t is None:
            raise shape_error(self.name, sp, s_raw, tp, t_raw, "hints need (B, C, H, W) maps or (B, C) vectors")
        if s.shape[0] != t.shape[0]:
            raise shape_error(self.name, sp, s_raw, tp, t_raw, "the batch sizes differ")
        return sp, s, tp, t

    # --- connectors -------------------------------------------------------------------------
    def build(self, student: ModelOutput, teacher: ModelOutput, num_samples: int) -> None:
        sp, s, tp, t = self._maps(student, teacher)
        (s_c, s_h, s_w), (t_c, t_h, t_w) = s.shape[1:], t.shape[1:]
        if s_h >= t_h and s_w >= t_w:
            conv: nn.Module = nn.Conv2d(s_c, t_c, kernel_size=(s_h - t_h + 1, s_w - t_w + 1), bias=False)
        elif t_h % s_h == 0 and t_w % s_w == 0 and t_h // s_h == t_w // s_w:
            k = t_h // s_h
            pad = (k + 1) // 2
            conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=2 * k, stride=k, padding=pad,
                                      output_padding=2 * pad - k, bias=False)
        else:
            raise shape_error(self.name, sp, s, tp, t,
                              "the FitNets regressor shrinks a larger guided map to the hint's size or "
                              "upsamples a smaller one by an integer factor; choose points whose maps allow that")
        layers: list[nn.Module] = [conv, nn.BatchNorm2d(t_c)]
        if bool((t >= 0).all()):
            layers.append(nn.ReLU())
        self.regressor = nn.Sequential(*layers).to(device=s.device, dtype=s.dtype)

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        if self.regressor is None:
            raise not_built(self.name)
        if not self._active():
            return {}
        _sp, s, _tp, t = self._maps(student, teacher)
        return {"fitnet": self.weight * F.mse_loss(self.regressor(s), t)}
