"""Kim, Park & Kwak, "Paraphrasing Complex Network: Network Compression via Factor Transfer" (NeurIPS 2018)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.algorithms.base import Batch, ModelOutput, register_method
from kdray.algorithms.feature.connectors import PhasedTerm, as_map, not_built, pool_to_common, shape_error


def _conv_stack(channels: list[int], transposed: bool = False) -> nn.Sequential:
    """3x3 (transposed) convolutions, each followed by LeakyReLU(0.1) (paper; authors' code)."""
    layers: list[nn.Module] = []
    for cin, cout in zip(channels, channels[1:]):
        conv = nn.ConvTranspose2d if transposed else nn.Conv2d
        layers += [conv(cin, cout, 3, stride=1, padding=1), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """Convolutional auto-encoder on the teacher's feature: ``C -> C -> kC -> kC`` and back."""

    def __init__(self, channels: int, factor_channels: int):
        super().__init__()
        self.encoder = _conv_stack([channels, channels, factor_channels, factor_channels])
        self.decoder = _conv_stack([factor_channels, factor_channels, channels, channels], transposed=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class Translator(nn.Module):
    """Three 3x3 convolutions mapping the student's feature to a ``kC_T``-channel factor."""

    def __init__(self, channels: int, factor_channels: int):
        super().__init__()
        self.encoder = _conv_stack([channels, channels, factor_channels, factor_channels])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


@register_method
class FT(PhasedTerm):
    """Factor transfer: match the student's *translated* factor to the teacher's *paraphrased* factor.

    A paraphraser (conv auto-encoder, paraphrase rate ``rate = k = 0.5``) is first trained on the
    teacher's feature with the paper's reconstruction loss ``||x - P(x)||^2`` (element mean). It is
    then frozen, and the student trains a translator (three 3x3 convs) with::

        weight * mean | F_T / ||F_T||_2 - F_S / ||F_S||_2 |^p      (p = 1, the paper's choice)

    where ``F_T`` is the paraphraser's encoding of the teacher's feature, ``F_S`` the translator's
    output, and each factor is l2-normalised as one vector per sample (the paper's FT loss).

    Phases, within one run (``set_epoch``): during the first ``paraphraser_epochs`` epochs only the
    paraphraser trains (loss key ``ft_paraphraser``) and :meth:`uses_hard_labels` is ``False``, so the
    distiller drops the CE and the student does not move; afterwards the paraphraser is frozen
    (``requires_grad=False``) and the translator + student train on the ``ft`` loss next to the CE.
    These epochs count in the run: to reproduce RepDistiller's 240 student epochs after its 30
    separate init epochs, run 270 epochs and shift the lr milestones by 30. Parameters without a
    gradient in a phase (the student and translator while pre-training) need DDP's
    ``find_unused_parameters=True``.

    Followed from the paper where RepDistiller differs: the factor is normalised as a whole
    (RepDistiller collapses the channels first, ``normalize(mean_c(F^2))``, an attention map), and
    neither paraphraser nor translator has BN (as in the authors' code; RepDistiller's translator has
    BN). The authors' code trains the paraphraser with an L1 loss; the paper states L2, used here.

    Points: the last stage (``feature_index=-1``; RepDistiller's ``feat[-2]``, the authors' last group).
    Spatial mismatch: the larger factor is adaptive-average-pooled to the smaller one.

    Defaults: ``weight=200`` is the RepDistiller CIFAR-100 weight (tuned there for its attention-style
    factor; the authors' code uses ``beta=500`` with the paper's factor); ``paraphraser_epochs=30`` is
    RepDistiller's ``init_epochs`` (the authors' code trains the paraphraser ~5 epochs).
    """

    name = "ft"
    kind = "feature"
    paper = "Kim, Park, Kwak 2018, Paraphrasing Complex Network: Network Compression via Factor Transfer"
    default_student_points = "stages"
    default_teacher_points = "stages"

    def __init__(self, weight: float = 200.0, rate: float = 0.5, p: int = 1, paraphraser_epochs: int = 30,
                 feature_index: int = -1):
        super().__init__()
        if weight < 0:
            raise ValueError(f"ft.weight must be >= 0, got {weight}")
        if not 0 < rate <= 4:
            raise ValueError(f"ft.rate must be in (0, 4], got {rate}")
        if p not in (1, 2):
            raise ValueError(f"ft.p must be 1 or 2, got {p}")
        if paraphraser_epochs < 0:
            raise ValueError(f"ft.paraphraser_epochs must be >= 0, got {paraphraser_epochs}")
        self.weight = weight
        self.rate = rate
        self.p = p
        self.paraphraser_epochs = paraphraser_epochs
        self.feature_index = feature_index
        self.paraphraser: Paraphraser | None = None
        self.translator: Translator | None = None

    # --- phases -----------------------------------------------------------------------------
    def in_paraphraser_training(self) -> bool:
        return self.epoch < self.paraphraser_epochs

    def uses_hard_labels(self) -> bool:
        return not self.in_paraphraser_training()

    def _apply_phase(self) -> None:
        if self.paraphraser is None:
            return
        pretraining = self.in_paraphraser_training()
        self.paraphraser.requires_grad_(pretraining)
        self.translator.requires_grad_(not pretraining)

    # --- features ---------------------------------------------------------------------------
    def _maps(self, student: ModelOutput, teacher: ModelOutput):
        s_points, t_points = list(self.student_points), list(self.teacher_points)
        try:
            sp, tp = s_points[self.feature_index], t_points[self.feature_index]
        except IndexError:
            raise ValueError(f"ft.feature_index={self.feature_index} is out of range for student points "
                             f"{s_points} and teacher points {t_points}") from None
        s_raw, t_raw = student.features[sp], teacher.features[tp]
        s, t = as_map(s_raw), as_map(t_raw)
        if s is None or t is None or s_raw.dim() != 4 or t_raw.dim() != 4:
            raise shape_error(self.name, sp, s_raw, tp, t_raw, "factor transfer needs (B, C, H, W) maps")
        if s.shape[0] != t.shape[0]:
            raise shape_error(self.name, sp, s_raw, tp, t_raw, "the batch sizes differ")
        return s, t

    def build(self, student: ModelOutput, teacher: ModelOutput, num_samples: int) -> None:
        s, t = self._maps(student, teacher)
        factor_channels = max(1, int(round(t.shape[1] * self.rate)))
        self.paraphraser = Paraphraser(t.shape[1], factor_channels).to(device=t.device, dtype=t.dtype)
        self.translator = Translator(s.shape[1], factor_channels).to(device=s.device, dtype=s.dtype)
        self._apply_phase()

    def factor_distance(self, factor_s: torch.Tensor, factor_t: torch.Tensor) -> torch.Tensor:
        factor_s, factor_t = pool_to_common(factor_s, factor_t)
        diff = F.normalize(factor_s.flatten(1), dim=1) - F.normalize(factor_t.flatten(1), dim=1)
        return diff.abs().mean() if self.p == 1 else diff.pow(2).mean()

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        if self.paraphraser is None:
            raise not_built(self.name)
        s, t = self._maps(student, teacher)
        if self.in_paraphraser_training():
            return {"ft_paraphraser": F.mse_loss(self.paraphraser(t), t)}
        with torch.no_grad():
            factor_t = self.paraphraser.encoder(t)
        return {"ft": self.weight * self.factor_distance(self.translator(s), factor_t)}
