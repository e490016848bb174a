"""Jin, Wang, Lin, "Multi-Level Logit Distillation" (MLKD, CVPR 2023), without its augmentation part."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method
from kdray.algorithms.response.kd import kl_div_with_temperature

TEMPERATURES = (2.0, 3.0, 4.0, 5.0, 6.0)


def gram_gap(p_s: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
    """``||p_t p_t^T - p_s p_s^T||_F^2 / rows``: the squared Frobenius distance of the two row-Gram matrices,
    divided by the number of rows (samples for ``B x K`` inputs; classes when given ``K x B``)."""
    return ((p_t @ p_t.t() - p_s @ p_s.t()) ** 2).sum() / p_s.shape[0]


def share_at_or_below_median(values: torch.Tensor) -> torch.Tensor:
    """The fraction of ``values`` that are ``<=`` their median (``np.percentile(., 50)``, linear interpolation)."""
    return (values <= torch.quantile(values, 0.5)).to(values.dtype).mean()


@register_method
class MLKD(KnowledgeTerm):
    """MLKD: align the predictions at three levels and several temperatures ("prediction augmentation").

    For every temperature ``tau`` in ``temperatures`` (the code's ``{4, 3, 5, 2, 6}``), with
    ``p = softmax(z / tau)`` (``B x K``):

    * **instance level**: ``tau^2 KL(p_t || p_s)``, batch mean (Hinton's KD at ``tau``);
    * **batch level**: ``||p_t p_t^T - p_s p_s^T||_F^2 / B``, the ``B x B`` sample-similarity (Gram) matrices;
    * **class level**: ``||p_t^T p_t - p_s^T p_s||_F^2 / K``, the ``K x K`` class-correlation matrices;

    each summed over the temperatures and multiplied by ``weight``; the CE is ``ce_weight * CE``.

    Follows the authors' ``MLKD.py`` (Jin-Ying/Multi-Level-Logit-Distillation, mdistiller-based; read in the
    copy kept by sunshangquan/logit-standardization-KD) on its *weak* view. Its augmentation part is left out:
    the second, strongly augmented view of every image (RandAugment-style "strong" inputs and the
    ``loss_kd_strong`` / ``loss_cc_strong`` / ``loss_bc_strong`` terms and the second CE) needs the data
    pipeline to hand the term two views, which kdray's batches do not carry. Two details of the code are
    reproduced as they are, because the published numbers come from them:

    * the confidence masks only *rescale*: the code multiplies the already batch-averaged loss by a mask
      (teacher confidence ``<=`` its batch median for the instance and batch levels; class confidence
      ``sum_b p_t`` ``<=`` its median for the class level) and takes the mean, which is the loss times the
      fraction of samples (classes) at or below the median, about 1/2 (see :func:`share_at_or_below_median`).
      The confidences use the teacher's softmax at temperature 1. The paper describes per-sample masking;
      kdray follows the code;
    * weights are mdistiller's KD defaults the MLKD configs inherit: ``ce_weight = 0.1``, ``weight = 0.9``
      (the code has one CE per view; with one view there is one). The term therefore brings its own CE
      (``provides_ce``): the distiller adds none.
    """

    name = "mlkd"
    kind = "response"
    paper = "Jin, Wang, Lin 2023, Multi-Level Logit Distillation (CVPR)"
    provides_ce = True

    def __init__(self, weight: float = 0.9, ce_weight: float = 0.1,
                 temperatures: tuple[float, ...] | list[float] = TEMPERATURES):
        super().__init__()
        temperatures = tuple(float(t) for t in temperatures)
        if not temperatures or any(t <= 0 for t in temperatures):
            raise ValueError(f"mlkd.temperatures must be a non-empty list of values > 0, got {list(temperatures)}")
        if weight < 0 or ce_weight < 0:
            raise ValueError(f"mlkd.weight and mlkd.ce_weight must be >= 0, got {weight} and {ce_weight}")
        self.weight = weight
        self.ce_weight = ce_weight
        self.temperatures = temperatures

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        z_s, z_t = student.logits, teacher.logits
        if z_t.shape != z_s.shape or z_s.dim() != 2:
            raise ValueError(f"mlkd: student logits {tuple(z_s.shape)} and teacher logits {tuple(z_t.shape)} "
                             f"differ in shape (same batch and classes needed)")
        p_t1 = F.softmax(z_t.detach(), dim=1)
        sample_share = share_at_or_below_median(p_t1.max(dim=1).values)
        class_share = share_at_or_below_median(p_t1.sum(dim=0))
        instance = batch_level = class_level = z_s.new_zeros(())
        for tau in self.temperatures:
            p_s, p_t = F.softmax(z_s / tau, dim=1), F.softmax(z_t / tau, dim=1)
            instance = instance + kl_div_with_temperature(z_s, z_t, tau)
            batch_level = batch_level + gram_gap(p_s, p_t)
            class_level = class_level + gram_gap(p_s.t(), p_t.t())
        w = self.weight
        return {"ce": self.ce_weight * F.cross_entropy(z_s, batch.targets),
                "mlkd_instance": w * sample_share * instance,
                "mlkd_batch": w * sample_share * batch_level,
                "mlkd_class": w * class_share * class_level}
