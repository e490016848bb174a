"""Yang et al., "Masked Generative Distillation" (ECCV 2022)."""
from __future__ import annotations

import torch
import torch.nn as nn

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method
from kdray.algorithms.feature.connectors import not_built, pool_to_common
from kdray.algorithms.feature.point_choice import pick_pair

MASKS = ("channel", "spatial")


@register_method
class MGD(KnowledgeTerm):
    """MGD: the student's feature, randomly masked, must *generate* the teacher's through a small block.

    ``S`` is the student's map aligned to the teacher's channels (a 1x1 conv with bias when the counts
    differ, none otherwise); a random binary mask ``M`` zeroes a fraction ``mask_ratio`` of it; the
    generator ``G`` (3x3 conv, ReLU, 3x3 conv, ``C_t`` channels throughout) reconstructs the teacher::

        L = weight * 1/B * sum_{b,c,h,w} (G(S * M) - T)^2

    (squared error summed, divided by the batch size: the paper's Eq. and the authors' code).

    The mask: the paper describes a random *spatial* mask (one draw per position, shared by the
    channels; ``mask="spatial"``, the detection / segmentation setting: ratio 0.65, weight 2e-5). The
    authors' classification code masks whole *channels* instead (one draw per sample and channel;
    ``mask="channel"``), with ratio 0.15 and weight 7e-5: these are the defaults here. Draws come from a
    ``torch.Generator`` seeded with ``seed`` (one per device), so a run's masks are reproducible; its
    state is not checkpointed (a resumed run draws a fresh sequence).

    Points: one pair, the last stage (``feature_index=-1``; the authors distil the last feature map).
    Spatial mismatch: the larger map is adaptive-average-pooled to the smaller (the code requires equal).
    """

    name = "mgd"
    kind = "feature"
    paper = "Yang et al. 2022, Masked Generative Distillation"
    default_student_points = "stages"
    default_teacher_points = "stages"

    def __init__(self, weight: float = 7e-5, mask_ratio: float = 0.15, mask: str = "channel", seed: int = 0,
                 feature_index: int = -1):
        super().__init__()
        if weight < 0:
            raise ValueError(f"mgd.weight must be >= 0, got {weight}")
        if not 0 <= mask_ratio < 1:
            raise ValueError(f"mgd.mask_ratio must be in [0, 1), got {mask_ratio}")
        if mask not in MASKS:
            raise ValueError(f"mgd.mask must be one of {MASKS}, got {mask!r}")
        self.weight = weight
        self.mask_ratio = mask_ratio
        self.mask = mask
        self.seed = seed
        self.feature_index = feature_index
        self.align: nn.Module | None = None
        self.generator: nn.Module | None = None
        self._rngs: dict[str, torch.Generator] = {}

    def build(self, student: ModelOutput, teacher: ModelOutput, num_samples: int) -> None:
        pair = pick_pair(self, student, teacher, self.feature_index, need_map=True)
        s_c, t_c = pair.student.shape[1], pair.teacher.shape[1]
        like = dict(device=pair.student.device, dtype=pair.student.dtype)
        self.align = (nn.Identity() if s_c == t_c else nn.Conv2d(s_c, t_c, kernel_size=1)).to(**like)
        self.generator = nn.Sequential(nn.Conv2d(t_c, t_c, 3, padding=1), nn.ReLU(),
                                       nn.Conv2d(t_c, t_c, 3, padding=1)).to(**like)

    def draw_mask(self, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
        """The binary keep-mask (1 keeps, 0 masks) for a ``(B, C, H, W)`` map: ``(B, C, 1, 1)`` or ``(B, 1, H, W)``."""
        b, c, h, w = shape
        key = str(like.device)
        if key not in self._rngs:
            self._rngs[key] = torch.Generator(device=like.device).manual_seed(self.seed)
        size = (b, c, 1, 1) if self.mask == "channel" else (b, 1, h, w)
        u = torch.rand(size, generator=self._rngs[key], device=like.device)
        return (u >= self.mask_ratio).to(like.dtype)

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        if self.align is None or self.generator is None:
            raise not_built(self.name)
        pair = pick_pair(self, student, teacher, self.feature_index, need_map=True)
        s, t = pool_to_common(self.align(pair.student), pair.teacher)
        generated = self.generator(s * self.draw_mask(s.shape, s))
        return {"mgd": self.weight * (generated - t).pow(2).sum() / t.shape[0]}
