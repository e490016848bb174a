"""Self-distillation "Be Your Own Teacher" (BYOT).

Zhang, Song, Gao, Chen, Bao and Ma, "Be Your Own Teacher: Improve the Performance of Convolutional
Neural Networks via Self Distillation", ICCV 2019 (arXiv:1905.08094).

The network is cut into sections at its stage outputs (``kd_stages``). Every stage except the deepest
gets an auxiliary exit (a bottleneck, global average pooling and a linear classifier); the model's own
head is the deepest exit and teaches the shallow ones during a single training run. Per exit ``i``::

    (1 - alpha) * CE(q_i, y)                                   every exit, the deepest included
  + alpha * T^2 * KL(softmax(z_C / T) || softmax(z_i / T))     shallow exits; z_C detached
  + lambda * ||F_i - F_C||_2^2                                 shallow exits; F_C detached

where ``F_i`` is the exit's pooled bottleneck feature and ``F_C`` the pooled deepest stage output (the
input of the model's classifier for ResNets and ``digits_cnn``). The squared L2 is summed over channels
and averaged over the batch.

Defaults: ``alpha = 0.3``, ``T = 3``, ``lambda = 0.03``. The paper states the loss with ``alpha`` and
``lambda`` as hyper-parameters; the values come from public implementations: ``T = 3`` with the ``T^2``
factor is the unofficial code's (``luanyunteng/pytorch-be-your-own-teacher``, ``train.py``), and
CE 0.7 / KD 0.3 at ``T = 3`` / feature 0.03 is MMRazor's BYOT recipe (``configs/distill/mmcls/byot``).
That unofficial code defaults to ``alpha = 0.1`` and a feature weight of ``1e-6`` on a squared error
*summed* over the batch, and MMRazor's CIFAR-100 config applies its 0.03 to the (unsquared) norm over the
whole batch, so neither feature weight maps one-to-one onto ``lambda`` here.

Simplification (stated, not hidden): the paper attaches bottleneck blocks before each shallow classifier;
here each exit is one simple bottleneck in the shape of the unofficial code's: 1x1 conv to
``C_deep / bottleneck_ratio`` channels, BN, ReLU; a ``k x k`` conv with stride ``k`` (``k`` = spatial
ratio to the deepest stage, or a 3x3 conv when that is not an integer), BN, ReLU; 1x1 conv to
``C_deep``, BN, ReLU; then average pooling and a linear classifier. No attention modules. Stages whose
output is a vector (an MLP) get the same shape with linear layers. The ensemble that
:meth:`BYOTDistiller.evaluate_exits` reports averages the exits' softmax probabilities.

The exits are read with forward hooks (:class:`~kdray.models.features.FeatureTap`); the model is never
rewritten, and :meth:`BYOTDistiller.export_student` returns it without the exits. Every exit parameter
takes part in every step's loss, so DDP needs no ``find_unused_parameters``.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from kdray.algorithms.base import Batch
from kdray.algorithms.distiller import Distiller, expand_points
from kdray.algorithms.precision import full_precision
from kdray.algorithms.response.kd import kl_div_with_temperature
from kdray.models.features import FeatureTap


def pooled(feature: torch.Tensor) -> torch.Tensor:
    """A stage output as one vector per sample: global average pooling of maps, vectors as they are."""
    if feature.dim() > 2:
        return feature.flatten(2).mean(dim=2)
    return feature


def byot_loss(exit_logits: list[torch.Tensor], exit_feats: list[torch.Tensor], deepest_logits: torch.Tensor,
              deepest_feat: torch.Tensor, targets: torch.Tensor, alpha: float = 0.3, temperature: float = 3.0,
              feature_weight: float = 0.03) -> dict[str, torch.Tensor]:
    """The BYOT loss as named, weighted terms (shallow exits numbered from 1, shallow to deep).

    ``ce_exit{i}`` = ``(1 - alpha) * CE``; ``kd_exit{i}`` = ``alpha * T^2 * KL(deepest_T || exit_T)``
    (batch mean); ``feat_exit{i}`` = ``feature_weight * mean_b ||f_i - f_deep||^2``; ``ce`` is the
    deepest exit's ``(1 - alpha) * CE``. The deepest logits and feature are detached as targets.
    Computed in fp32 when the exits ran under bf16 / fp16 autocast.
    """
    exit_logits, exit_feats = [full_precision(z) for z in exit_logits], [full_precision(f) for f in exit_feats]
    deepest_logits, deepest_feat = full_precision(deepest_logits), full_precision(deepest_feat)
    if len(exit_logits) != len(exit_feats):
        raise ValueError(f"{len(exit_logits)} exit logits but {len(exit_feats)} exit features")
    soft_target = deepest_logits.detach()
    feat_target = deepest_feat.detach()
    losses: dict[str, torch.Tensor] = {}
    for i, (logits, feat) in enumerate(zip(exit_logits, exit_feats), start=1):
        if feat.shape != feat_target.shape:
            raise ValueError(f"exit {i} feature has shape {tuple(feat.shape)}, the deepest feature "
                             f"{tuple(feat_target.shape)}")
        losses[f"ce_exit{i}"] = (1 - alpha) * F.cross_entropy(logits, targets)
        losses[f"kd_exit{i}"] = alpha * kl_div_with_temperature(logits, soft_target, temperature)
        losses[f"feat_exit{i}"] = feature_weight * (feat - feat_target).pow(2).flatten(1).sum(dim=1).mean()
    losses["ce"] = (1 - alpha) * F.cross_entropy(deepest_logits, targets)
    return losses


def _exit_correct(logits: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Correct top-1 counts per exit (shallow to deepest) and of the ensemble (mean of softmaxes)."""
    probs = torch.stack([F.softmax(z.float(), dim=1) for z in logits]).mean(dim=0)
    hits = [(z.argmax(dim=1) == targets).sum() for z in logits] + [(probs.argmax(dim=1) == targets).sum()]
    return torch.stack(hits).double()


def _exit_names(n_exits: int) -> list[str]:
    return [f"exit{i}" for i in range(1, n_exits)] + ["final", "ensemble"]


def exit_accuracies(logits: list[torch.Tensor], targets: torch.Tensor) -> dict[str, float]:
    """Top-1 of each exit (``exit1``.., ``final`` = the deepest) and of their ``ensemble`` on one batch.

    ``logits`` are ordered shallow to deep, as :meth:`BYOTDistiller.exit_logits` returns them. The
    ensemble averages the exits' softmax probabilities.
    """
    correct = _exit_correct(logits, targets) / max(targets.numel(), 1)
    return dict(zip(_exit_names(len(logits)), correct.tolist()))


def _conv_bn_relu(cin: int, cout: int, kernel, stride, padding=0) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU()]


class AuxExit(nn.Module):
    """Bottleneck (to the deepest stage's channel count), global average pooling and a linear classifier.

    ``forward(stage_output) -> (logits, feature)`` where ``feature`` is the pooled bottleneck output.
    """

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], num_classes: int,
                 bottleneck_ratio: int = 4):
        super().__init__()
        cin, cout = in_shape[0], out_shape[0]
        mid = max(1, cout // bottleneck_ratio)
        if len(in_shape) == 3:
            h, w = in_shape[1:]
            hd, wd = out_shape[1:] if len(out_shape) == 3 else (1, 1)
            if h % hd == 0 and w % wd == 0:
                k = (h // hd, w // wd)
                middle = _conv_bn_relu(mid, mid, k, k)
            else:  # no integer ratio: keep the size, pooling evens it out
                middle = _conv_bn_relu(mid, mid, 3, 1, 1)
            self.bottleneck = nn.Sequential(*_conv_bn_relu(cin, mid, 1, 1), *middle,
                                            *_conv_bn_relu(mid, cout, 1, 1))
        elif len(in_shape) == 1:
            self.bottleneck = nn.Sequential(nn.Linear(cin, mid, bias=False), nn.BatchNorm1d(mid), nn.ReLU(),
                                            nn.Linear(mid, cout, bias=False), nn.BatchNorm1d(cout), nn.ReLU())
        else:
            raise ValueError(f"BYOT exits take (C, H, W) maps or (C,) vectors, got a stage of shape {in_shape}")
        self.fc = nn.Linear(cout, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = pooled(self.bottleneck(x))
        return self.fc(feat), feat


class BYOTDistiller(Distiller):
    """BYOT self-distillation: the model's deepest exit teaches auxiliary exits on its shallower stages.

    A :class:`~kdray.algorithms.distiller.Distiller` without a teacher: ``forward(batch, teacher_out)``
    ignores ``teacher_out`` and returns the deepest exit's logits with ``ce_exit{i}``, ``kd_exit{i}``,
    ``feat_exit{i}`` (shallow exit ``i`` on ``stages[i - 1]``) and ``ce`` (the deepest exit).

    ``stages``: module paths of the stage outputs, shallow to deep (default: the model's ``kd_stages``);
    the deepest one is the model's own exit. The aux exits are created by :meth:`build` (or at once when
    ``example_inputs`` is given), which must run before the optimizer is made.
    """

    def __init__(self, model: nn.Module, alpha: float = 0.3, temperature: float = 3.0,
                 feature_weight: float = 0.03, stages="stages", bottleneck_ratio: int = 4,
                 example_inputs: torch.Tensor | None = None):
        super().__init__(model)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"byot.alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"byot.temperature must be > 0, got {temperature}")
        if feature_weight < 0:
            raise ValueError(f"byot.feature_weight must be >= 0, got {feature_weight}")
        if bottleneck_ratio < 1:
            raise ValueError(f"byot.bottleneck_ratio must be >= 1, got {bottleneck_ratio}")
        points = list(dict.fromkeys(expand_points(model, stages, "student")))
        if len(points) < 2:
            raise ValueError(f"BYOT needs at least two stages (one shallow exit and the deepest), got {points}")
        self.alpha = alpha
        self.temperature = temperature
        self.feature_weight = feature_weight
        self.bottleneck_ratio = bottleneck_ratio
        self.stage_points = points
        self.student_points = list(points)
        self._tap = FeatureTap(model, points, role="student")
        self.exits = nn.ModuleList()
        self._built = False
        if example_inputs is not None:
            self.build(example_inputs)

    @torch.no_grad()
    def build(self, example_inputs: torch.Tensor, teacher=None, num_samples: int = 0) -> None:
        """Create the aux exits from the stage shapes of one example batch (eval mode, no grad)."""
        if self._built:
            return
        was_training = self.student.training
        self.student.eval()
        out = self.student_forward(example_inputs)
        self.student.train(was_training)
        deepest = out.features[self.stage_points[-1]]
        num_classes = out.logits.shape[1]
        param = next(self.student.parameters(), None)
        device = example_inputs.device if param is None else param.device
        dtype = torch.get_default_dtype() if param is None else param.dtype  # exits follow the model
        for point in self.stage_points[:-1]:
            head = AuxExit(tuple(out.features[point].shape[1:]), tuple(deepest.shape[1:]), num_classes,
                           self.bottleneck_ratio)
            self.exits.append(head.to(device=device, dtype=dtype))
        self._built = True

    def _check_built(self):
        if not self._built:
            raise RuntimeError("BYOTDistiller has no exits yet: call build(example_inputs) (or pass "
                               "example_inputs) before making the optimizer")

    def _outputs(self, inputs: torch.Tensor):
        out = self.student_forward(inputs)
        exits = [head(out.features[p]) for head, p in zip(self.exits, self.stage_points[:-1])]
        return out, [z for z, _ in exits], [f for _, f in exits]

    def forward(self, batch: Batch, teacher_out=None):
        self._check_built()
        out, exit_logits, exit_feats = self._outputs(batch.inputs)
        deepest_feat = pooled(out.features[self.stage_points[-1]])
        losses = byot_loss(exit_logits, exit_feats, out.logits, deepest_feat, batch.targets, self.alpha,
                           self.temperature, self.feature_weight)
        return out.logits, losses

    def exit_logits(self, inputs: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit, shallow to deep (the last is the model's own output)."""
        self._check_built()
        out, exit_logits, _ = self._outputs(inputs)
        return exit_logits + [out.logits]

    @torch.no_grad()
    def evaluate_exits(self, loader: Iterable, device) -> dict[str, float]:
        """Top-1 of each exit (``exit1``.., ``final``) and of the ``ensemble``; counts summed across ranks."""
        self._check_built()
        was_training = self.training
        self.eval()
        totals = torch.zeros(len(self.exits) + 3, dtype=torch.float64, device=device)  # exits, final, ens, n
        for raw in loader:
            x, y = raw[0].to(device), raw[1].to(device)
            totals[:-1] += _exit_correct(self.exit_logits(x), y)
            totals[-1] += y.numel()
        self.train(was_training)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        n = max(float(totals[-1]), 1.0)
        return dict(zip(_exit_names(len(self.exits) + 1), (totals[:-1] / n).tolist()))
