"""Adversarial distillation: a discriminator tells the teacher's outputs from the student's, and the student
learns to fool it, beside (or instead of) the usual knowledge terms.

What kdray follows, and where it departs:

* **Discriminator on the logits** (:class:`LogitDiscriminator`): MEAL-V2 (Shen & Savvides 2020) puts a small
  3-layer discriminator with a sigmoid output on the networks' class outputs. Here it is an MLP on the softmax
  probabilities (temperature 1): ``classes -> hidden -> hidden -> 1`` with LeakyReLU(0.2); the sigmoid is folded
  into the loss (``binary_cross_entropy_with_logits``, numerically stable) instead of being a layer.
* **Conditional discriminator** (``conditional=True``; Xu et al. 2018, conditional adversarial networks): the
  one-hot label of the sample is concatenated to what the discriminator reads (both halves), so it judges
  whether an output is the teacher's *for that class*. Departure: Xu et al. also train an auxiliary classifier
  head on the discriminator and a sample-level adversarial loss; kdray keeps the real/fake head alone. MEAL-V2's
  discriminator is unconditional (the default).
* **Discriminator on a feature point** (:class:`FeatureDiscriminator`): the feature (``N, C, H, W`` or
  ``N, C``) is average-pooled to a vector; when the student's width differs from the teacher's a linear
  projection maps the student's vector to the teacher's width. The projection is part of the discriminator
  (trained by its optimizer, like its other front-end layers): the student's gradient flows through it but
  the student's optimizer never owns it, so the student cannot cheat by moving the projection.
* **Losses** (:func:`discriminator_loss`, :func:`fool_loss`): the discriminator's BCE with teacher = real (1),
  student = fake (0), summed over the two halves; the student's non-saturating "fool" loss
  ``BCE(D(student), 1)`` (Goodfellow et al.'s usual form, also MEAL-V2's).
* **The loop** (:class:`AdversarialLoop`): per step the teacher and the student run once; the discriminator
  is updated ``d_steps`` times on teacher and ``student.detach()`` (one forward scoring both, so a
  DDP-wrapped discriminator sees one forward per backward), then the student is updated on its knowledge
  terms plus ``weight * fool`` with the just-updated discriminator. The discriminator has its own optimizer
  (Adam in the orchestrator) and is checkpointed with it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.algorithms import precision as prec
from kdray.algorithms.base import Batch
from kdray.algorithms.engine import NonFiniteLossError, TrainLoop


def _mlp(width: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
                         nn.Linear(hidden, 1))


class LogitDiscriminator(nn.Module):
    """Real/fake scores (logits; sigmoid = probability of *teacher*) of class logits, read as softmax
    probabilities. ``forward(real, fake)`` scores the teacher's rows then the student's (either may be
    ``None``) in one call, so a DDP-wrapped discriminator has one forward per backward."""

    def __init__(self, num_classes: int, hidden: int = 64, conditional: bool = False):
        super().__init__()
        self.num_classes = num_classes if conditional else 0
        self.net = _mlp(num_classes + self.num_classes, hidden)

    def forward(self, real: torch.Tensor | None = None, fake: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        halves = [F.softmax(t.float(), dim=1) for t in (real, fake) if t is not None]
        return self.net(with_labels(halves, labels, self.num_classes)).squeeze(1)

    def set_process_group(self, group) -> None:  # the DDP wrap hands its group to trainable modules; none needed
        pass


def with_labels(halves: list[torch.Tensor], labels: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """The discriminator's input rows: each half (teacher's, student's) with the samples' one-hot labels
    appended when it is conditional (``num_classes > 0``), the halves stacked."""
    if num_classes:
        if labels is None:
            raise ValueError("a conditional discriminator needs the samples' labels")
        one_hot = F.one_hot(labels.long(), num_classes).float()
        halves = [torch.cat([h, one_hot], dim=1) for h in halves]
    return torch.cat(halves)


def pool(feature: torch.Tensor) -> torch.Tensor:
    """A feature map (``N, C, ...``) as one vector per sample: the mean over every axis after the channels."""
    feature = feature.float()
    return feature.flatten(2).mean(2) if feature.dim() > 2 else feature


class FeatureDiscriminator(nn.Module):
    """Real/fake scores of pooled features, ``forward(real, fake)`` as :class:`LogitDiscriminator`'s. The
    teacher's vector (``teacher_width``) goes in as it is; the student's (``student_width``) through a linear
    projection when the widths differ."""

    def __init__(self, student_width: int, teacher_width: int, hidden: int = 64, num_classes: int = 0):
        super().__init__()
        self.project = (nn.Linear(student_width, teacher_width, bias=False) if student_width != teacher_width
                        else nn.Identity())
        self.num_classes = num_classes  # > 0: conditional on the one-hot label
        self.net = _mlp(teacher_width + num_classes, hidden)

    def forward(self, real: torch.Tensor | None = None, fake: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        vectors = ([pool(real)] if real is not None else []) + ([self.project(pool(fake))] if fake is not None else [])
        return self.net(with_labels(vectors, labels, self.num_classes)).squeeze(1)

    def set_process_group(self, group) -> None:
        pass


def discriminator_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """``BCE(D(teacher), 1) + BCE(D(student), 0)``, each the batch mean; scores are logits."""
    return (F.binary_cross_entropy_with_logits(real_scores, torch.ones_like(real_scores))
            + F.binary_cross_entropy_with_logits(fake_scores, torch.zeros_like(fake_scores)))


def fool_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """The student's non-saturating adversarial loss ``BCE(D(student), 1)`` (batch mean)."""
    return F.binary_cross_entropy_with_logits(fake_scores, torch.ones_like(fake_scores))


def discriminator_hits(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> tuple[int, int]:
    """(correct, total) of the discriminator: teacher scored > 0, student scored <= 0."""
    correct = int((real_scores > 0).sum()) + int((fake_scores <= 0).sum())
    return correct, real_scores.numel() + fake_scores.numel()


def bare(module: nn.Module) -> nn.Module:
    """A module without its DDP wrapper."""
    return getattr(module, "module", module)


class AdversarialLoop(TrainLoop):
    """A :class:`TrainLoop` that also trains a discriminator against the student.

    ``on``: ``logits`` (the discriminator reads both networks' logits) or ``feature`` (the outputs of
    ``student_tap`` / ``teacher_tap``, two :class:`~kdray.models.features.FeatureTap` s on one point each, of the
    student and the teacher model). ``weight``: the fool loss's weight in the student's loss (logged as
    ``train_adv``, weighted). Per epoch it adds ``train_disc_loss`` and ``train_disc_acc`` (the discriminator's
    accuracy on all the epoch's teacher + student outputs, measured before each of its updates).
    """

    def __init__(self, *, discriminator: nn.Module, disc_optimizer, weight: float = 1.0, d_steps: int = 1,
                 on: str = "logits", student_tap=None, teacher_tap=None, **loop_kwargs):
        super().__init__(**loop_kwargs)
        if on not in ("logits", "feature"):
            raise ValueError(f"adversarial on must be 'logits' or 'feature', got {on!r}")
        if on == "feature" and (student_tap is None or teacher_tap is None):
            raise ValueError("adversarial on 'feature' needs a student_tap and a teacher_tap")
        if d_steps < 1:
            raise ValueError(f"d_steps must be >= 1, got {d_steps}")
        self.discriminator = discriminator
        self.disc_optimizer = disc_optimizer
        self.weight, self.d_steps, self.on = weight, d_steps, on
        self.student_tap, self.teacher_tap = student_tap, teacher_tap
        self.disc_sums = {"loss": 0.0, "updates": 0, "correct": 0, "seen": 0}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "discriminator": bare(self.discriminator).state_dict(),
                "disc_optimizer": self.disc_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        bare(self.discriminator).load_state_dict(state["discriminator"])
        self.disc_optimizer.load_state_dict(state["disc_optimizer"])

    def forward_both(self, batch: Batch):
        """Teacher and student forward under the loop's autocast: the teacher's output, the student's logits and
        named losses, and what the discriminator reads of each (real, fake)."""
        with prec.autocast(self.device, self.precision):
            if self.on == "feature":
                with self.teacher_tap.capture() as t_feats:
                    teacher_out = self.teacher(batch.inputs)
                with self.student_tap.capture() as s_feats:
                    logits, losses = self.distiller(batch, teacher_out)
                (real,), (fake,) = t_feats.values(), s_feats.values()
            else:
                wants_batch = getattr(self.teacher, "wants_batch", False)
                teacher_out = self.teacher(batch if wants_batch else batch.inputs)
                logits, losses = self.distiller(batch, teacher_out)
                real, fake = teacher_out.logits, logits
        return dict(losses), prec.full_precision(real).detach(), prec.full_precision(fake)

    def step(self, batch: Batch, epoch: int = 0, step: int = 0):
        losses, real, fake = self.forward_both(batch)
        n = real.shape[0]
        for _ in range(self.d_steps):  # the discriminator first: teacher = real, student (detached) = fake
            scores = self.discriminator(real, fake.detach(), labels=batch.targets)
            d_loss = discriminator_loss(scores[:n], scores[n:])
            if not torch.isfinite(d_loss):
                raise NonFiniteLossError(f"non-finite discriminator loss at epoch {epoch} step {step}: "
                                         f"{float(d_loss.detach())}; lower adversarial.lr")
            correct, seen = discriminator_hits(scores[:n].detach(), scores[n:].detach())
            self.disc_sums["loss"] += float(d_loss.detach())
            self.disc_sums["updates"] += 1
            self.disc_sums["correct"] += correct
            self.disc_sums["seen"] += seen
            self.disc_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            self.disc_optimizer.step()
        losses["adv"] = self.weight * fool_loss(self.discriminator(fake=fake, labels=batch.targets))
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            bad = [k for k, v in losses.items() if not torch.isfinite(v)]
            raise NonFiniteLossError(f"non-finite loss at epoch {epoch} step {step}: term(s) {bad} = "
                                     f"{[float(losses[k].detach()) for k in bad]}; lower the lr or the term's weight")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)  # the student's optimizer: the discriminator's gradients are left unused
        self.scaler.update()
        self.disc_optimizer.zero_grad(set_to_none=True)
        return loss, losses

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.discriminator.train()
        self.disc_sums = {"loss": 0.0, "updates": 0, "correct": 0, "seen": 0}
        metrics = super().train_epoch(epoch)
        sums = self.disc_sums
        metrics["train_disc_loss"] = sums["loss"] / max(sums["updates"], 1)
        metrics["train_disc_acc"] = sums["correct"] / max(sums["seen"], 1)
        return metrics
