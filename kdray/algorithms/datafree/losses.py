"""Losses of data-free distillation, each as its paper writes it (departures from the released code named).

DAFL (Chen et al., ICCV 2019), the generator's loss ``L_oh + alpha L_a + beta L_ie`` on the fixed teacher:
- :func:`one_hot_loss`: cross-entropy of the teacher's logits against their own arg-max (images the teacher
  classifies confidently);
- :func:`activation_loss`: minus the mean absolute activation of the teacher's features (the released code's
  ``-features.abs().mean()``; the paper's ``-1/n sum_i ||f_i||_1`` is it times the feature size, a scale the
  weight ``alpha`` absorbs);
- :func:`information_entropy_loss`: ``sum_k p_k log p_k`` of the batch's mean teacher prediction ``p`` (minus its
  entropy: a batch balanced over classes). Natural log; the released code uses ``log10`` (a 1/ln 10 scale).
Paper defaults: ``alpha = 0.1``, ``beta = 5``.

DFAD (Fang et al. 2019): :func:`discrepancy_l1`, the mean absolute difference of teacher and student logits;
the student minimises it, the generator maximises it. ZSKT (Micaelli & Storkey, NeurIPS 2019) uses the KL of
the student from the teacher instead (:func:`kdray.algorithms.response.kd.kl_div_with_temperature` at T = 1),
and adds to the student's loss (never the generator's) :func:`zskt_attention`, ``beta`` (paper 250) times the
attention-transfer distance summed over blocks.

DeepInversion (Yin et al., CVPR 2020), images optimised from noise: :class:`BatchNormStatistics` (the distance
of each BatchNorm input's batch mean / variance from the running statistics, ``||mu - mu_bn||_2 +
||var - var_bn||_2`` summed over layers, as the released code) and :func:`total_variation_l2` (the released
code's image prior: the L2 norms of the four neighbour differences, horizontal, vertical and both diagonals);
the class prior is the cross-entropy of the teacher's logits against the wanted labels.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def one_hot_loss(teacher_logits: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(teacher_logits.float(), teacher_logits.argmax(dim=1))


def activation_loss(teacher_features: torch.Tensor) -> torch.Tensor:
    return -teacher_features.float().abs().mean()


def information_entropy_loss(teacher_logits: torch.Tensor) -> torch.Tensor:
    mean = F.softmax(teacher_logits.float(), dim=1).mean(dim=0)
    return (mean * torch.log(mean.clamp_min(1e-12))).sum()


def dafl_generator_loss(teacher_logits: torch.Tensor, teacher_features: torch.Tensor, alpha: float = 0.1,
                        beta: float = 5.0) -> dict[str, torch.Tensor]:
    """DAFL's generator loss and its parts (named so a training loop can log each)."""
    parts = {"one_hot": one_hot_loss(teacher_logits), "activation": activation_loss(teacher_features),
             "information_entropy": information_entropy_loss(teacher_logits)}
    parts["generator"] = parts["one_hot"] + alpha * parts["activation"] + beta * parts["information_entropy"]
    return parts


def discrepancy_l1(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    return (teacher_logits.float() - student_logits.float()).abs().mean()


def spatial_attention(feature: torch.Tensor) -> torch.Tensor:
    """ZSKT's attention map: the channel mean of the squared activations, flattened and l2-normalised per
    sample, ``(B, C, H, W) -> (B, H*W)``."""
    return F.normalize(feature.float().pow(2).mean(dim=1).flatten(1), p=2, dim=1)


def zskt_attention(student_features: list[torch.Tensor], teacher_features: list[torch.Tensor]) -> torch.Tensor:
    """ZSKT's attention term, as its released code: ``sum_l mean((a_s - a_t)^2)`` over block pairs ``l`` of
    :func:`spatial_attention` maps (the mean runs over the batch and the positions). Blocks of different sizes
    are adaptive-average-pooled to the smaller map first (ZSKT's WideResNets share them; a departure only where
    they differ). Not Zagoruyko & Komodakis' l2 norm (kdray's ``at`` method): the released ZSKT code's form."""
    if len(student_features) != len(teacher_features) or not student_features:
        raise ValueError(f"ZSKT's attention term pairs blocks one to one: {len(student_features)} student and "
                         f"{len(teacher_features)} teacher feature maps")
    total = 0.0
    for s, t in zip(student_features, teacher_features):
        size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
        s, t = F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size)
        total = total + (spatial_attention(s) - spatial_attention(t)).pow(2).mean()
    return total


def total_variation_l2(images: torch.Tensor) -> torch.Tensor:
    x = images.float()
    diffs = (x[:, :, :, :-1] - x[:, :, :, 1:], x[:, :, :-1, :] - x[:, :, 1:, :],
             x[:, :, 1:, :-1] - x[:, :, :-1, 1:], x[:, :, :-1, :-1] - x[:, :, 1:, 1:])
    return sum(torch.norm(d) for d in diffs)


class BatchNormStatistics:
    """Forward hooks on every BatchNorm2d of ``model`` recording how far its input batch's per-channel mean and
    (biased) variance are from the layer's running statistics; :meth:`loss` sums them over the layers of the last
    forward. A model without BatchNorm cannot be inverted this way: one-line error."""

    def __init__(self, model: nn.Module):
        layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        if not layers:
            raise ValueError(f"DeepInversion matches the teacher's BatchNorm statistics, but {type(model).__name__} "
                             f"has no BatchNorm2d layer; use DAFL or DFAD for this teacher")
        self.distances: list[torch.Tensor] = []
        self.handles = [layer.register_forward_hook(self._record) for layer in layers]

    def _record(self, module: nn.BatchNorm2d, inputs, output) -> None:
        x = inputs[0].float()
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        self.distances.append(torch.norm(module.running_mean - mean, 2) + torch.norm(module.running_var - var, 2))

    def loss(self) -> torch.Tensor:
        total = sum(self.distances)
        self.distances = []
        return total

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
