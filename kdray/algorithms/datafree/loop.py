"""The data-free training loop: the student learns from the teacher on generated batches, never a training image.

An epoch is ``steps_per_epoch`` iterations, each on a batch made from noise; validation and test still use the
real val / test splits (the loop's ``val_loader``; ``train_loader`` is never read). Methods:

- ``dafl`` (Chen et al., ICCV 2019): per iteration one generator update on DAFL's loss
  (:func:`~kdray.algorithms.datafree.losses.dafl_generator_loss`, one-hot + ``alpha`` activation + ``beta``
  information entropy on the fixed teacher; paper ``alpha = 0.1``, ``beta = 5``), then one student update with
  the distiller's knowledge terms (the config's ``methods``, KD by default) on the *detached* batch, the
  teacher's arg-max as the hard labels. The paper trains the student with KD at T = 1 (its released code).
- ``dfad`` (Fang et al. 2019): ``student_steps`` (paper 5) student updates minimising the L1 discrepancy of
  student and teacher logits on detached batches, then ``generator_steps`` (paper 1) generator updates
  maximising it (gradients through the frozen teacher and the student, whose weights are not stepped).
- ``zskt`` (Micaelli & Storkey, NeurIPS 2019): as ``dfad`` with the KL divergence KL(teacher || student) at
  T = 1, paper ``generator_steps = 1``, ``student_steps = 10``; ``attention_weight`` (the paper's ``beta``, 250;
  default 0, the paper's KL-only ablation) adds :func:`~kdray.algorithms.datafree.losses.zskt_attention` over
  ``attention_points`` (student, teacher) block pairs to the student's loss only, as the paper.
- ``noise`` (a baseline): the student distilled (as ``dafl``'s student step) on pure ``N(0, 1)`` inputs of the
  teacher's input shape; no generator.

Departures at digits scale (8x8 images, a few hundred iterations on a CPU) are the caller's numbers
(``steps_per_epoch``, learning rates); the loop's mechanics are the papers'. Papers use a generator lr of 1e-3
(DFAD, ZSKT) / 0.2 with Adam (DAFL's CIFAR setting); here the generator's optimizer is whatever the caller
passes (the scheme builds Adam).

Each worker draws its noise from its own ``torch.Generator``, re-seeded at each epoch's start from
``(noise_seed..., epoch)`` (the caller passes the stage seed and the rank), so N data-parallel workers explore N
times the samples while DDP keeps the generator and student in step. Why re-seed per epoch rather than only
checkpoint the stream: a checkpoint holds rank 0's loop state, which every rank loads on resume; a stream
derived from (seed, rank, epoch) continues each rank's own samples exactly. :meth:`state_dict` holds the
generator, its optimizer and the stream's state too, so a resumed run continues exactly where the
uninterrupted one would be.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.algorithms.base import Batch, ModelOutput
from kdray.algorithms.datafree.losses import dafl_generator_loss, discrepancy_l1, zskt_attention
from kdray.algorithms.distiller import forward_with_features
from kdray.algorithms.engine import NonFiniteLossError, TrainLoop
from kdray.models.features import FeatureTap, default_points, unwrap

METHODS = ("dafl", "dfad", "zskt", "noise")


def kl_discrepancy(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """ZSKT's KL(teacher || student) at T = 1, batch mean."""
    return F.kl_div(F.log_softmax(student_logits.float(), dim=1), F.softmax(teacher_logits.float(), dim=1),
                    reduction="batchmean")


def epoch_seed(noise_seed: tuple[int, ...], epoch: int) -> int:
    """A 63-bit seed for one worker's epoch of noise, well mixed from ``(stage seed, rank, epoch)``."""
    return int(np.random.SeedSequence([*noise_seed, epoch]).generate_state(2, np.uint64)[0] >> np.uint64(1))


@contextlib.contextmanager
def frozen(module: nn.Module):
    """``module``'s parameters without gradients for a while: the generator's step backpropagates through the
    student to the images without touching (or DDP-reducing) the student's gradients."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class DataFreeLoop(TrainLoop):
    """A :class:`TrainLoop` whose epochs are ``steps_per_epoch`` iterations on generated batches.

    ``generator`` is the trainable generator (maybe DDP-wrapped; ``None`` for ``noise``) with its own
    ``generator_optimizer``; ``noise_seed`` seeds this worker's noise stream (the stage seed and the rank);
    ``input_shape`` is the teacher's ``(C, H, W)``. ``last_images`` holds the last generated batch of the
    latest epoch (what an epoch callback logs as an image grid)."""

    def __init__(self, *, method: str, generator: nn.Module | None, generator_optimizer, noise_seed: tuple[int, ...],
                 input_shape: tuple[int, ...], steps_per_epoch: int, batch_size: int, student_steps: int = 1,
                 generator_steps: int = 1, alpha: float = 0.1, beta: float = 5.0, input_mean: float = 0.0,
                 input_std: float = 1.0, attention_weight: float = 0.0,
                 attention_points: tuple[list[str], list[str]] | None = None, **loop_kwargs):
        if method not in METHODS:
            raise ValueError(f"data-free method {method!r} is not one of {', '.join(METHODS)}")
        if (generator is None) != (method == "noise"):
            raise ValueError(f"data-free method {method!r} {'takes no' if method == 'noise' else 'needs a'} generator")
        super().__init__(**loop_kwargs)
        if self.teacher is None:
            raise ValueError("data-free distillation needs a teacher")
        if getattr(self.teacher, "wants_batch", False):
            raise ValueError("data-free distillation needs the teacher's model (it is run on generated images); "
                             "a cached teacher only holds the training set's outputs")
        self.method = method
        self.generator = generator
        self.generator_optimizer = generator_optimizer
        self.noise_seed = tuple(int(v) for v in noise_seed)
        self.noise = torch.Generator()
        self.input_shape = tuple(input_shape)
        self.steps_per_epoch = steps_per_epoch
        self.batch_size = batch_size
        self.student_steps = student_steps
        self.generator_steps = generator_steps
        self.alpha, self.beta = alpha, beta
        self.input_mean, self.input_std = input_mean, input_std
        self.last_images: torch.Tensor | None = None
        teacher_model = self.teacher.model
        # DAFL's activation term reads the teacher's embedding (its declared ``kd_embedding``; none: the logits).
        points = default_points(teacher_model, "embedding", "teacher") if method == "dafl" else []
        self.teacher_tap = FeatureTap(teacher_model, points, role="teacher") if points else None
        self.attention_weight = attention_weight
        self.attention_taps = None
        if attention_weight:
            if method != "zskt":
                raise ValueError(f"the attention term is ZSKT's (method zskt), not {method!r}'s")
            student_points, teacher_points = attention_points or (
                default_points(unwrap(self.distiller).student, "stages", "student"),
                default_points(teacher_model, "stages", "teacher"))
            if len(student_points) != len(teacher_points):
                raise ValueError(f"ZSKT's attention pairs blocks one to one: student points {student_points}, "
                                 f"teacher points {teacher_points}")
            self.attention_taps = (FeatureTap(unwrap(self.distiller).student, student_points, "student"),
                                   FeatureTap(teacher_model, teacher_points, "teacher"))

    # --- checkpoint state -------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["noise"] = self.noise.get_state()
        if self.generator is not None:
            state["generator"] = unwrap(self.generator).state_dict()
            state["generator_optimizer"] = self.generator_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.noise.set_state(state["noise"])
        if self.generator is not None:
            unwrap(self.generator).load_state_dict(state["generator"])
            self.generator_optimizer.load_state_dict(state["generator_optimizer"])

    # --- the batches ------------------------------------------------------------------------
    def draw(self) -> torch.Tensor:
        """One batch of inputs: the generator's images of this worker's noise, or the noise itself (``noise``),
        both ``N(0, 1)``-scaled (the generator ends in an affine-free BatchNorm) and then moved to the
        teacher's input scale, ``input_mean + input_std * x`` (DAFL's code feeds them to a teacher trained on
        normalised inputs, i.e. mean 0 / std 1, the defaults; digits' inputs are raw [0, 1] pixels)."""
        if self.generator is None:
            x = torch.randn(self.batch_size, *self.input_shape, generator=self.noise).to(self.device)
        else:
            z = torch.randn(self.batch_size, unwrap(self.generator).latent_dim, generator=self.noise)
            x = self.generator(z.to(self.device))
        return x if (self.input_mean, self.input_std) == (0.0, 1.0) else self.input_mean + self.input_std * x

    def teacher_forward(self, images: torch.Tensor) -> ModelOutput:
        """The frozen teacher on ``images`` *with* gradients to the images (``Teacher.forward`` is no_grad)."""
        out = forward_with_features(self.teacher.model, self.teacher_tap, images)
        order = self.teacher.class_order
        if order is not None:
            out.logits = out.logits.index_select(1, order)
        return out

    def check_finite(self, losses: dict[str, torch.Tensor], epoch: int, step: int) -> None:
        bad = [k for k, v in losses.items() if not torch.isfinite(v)]
        if bad:
            raise NonFiniteLossError(f"non-finite loss at epoch {epoch} step {step}: term(s) {bad}; lower "
                                     f"data_free.generator_lr or train.lr")

    def generator_update(self, loss: torch.Tensor) -> None:
        self.generator_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.generator_optimizer.step()

    def student_update(self, images: torch.Tensor, epoch: int, step: int) -> dict[str, torch.Tensor]:
        """One student step on detached ``images``: the distiller's terms (``dafl``, ``noise``) or the
        discrepancy (``dfad`` L1, ``zskt`` KL). Returns its losses and their sum ``loss`` (the student's loss,
        logged as ``train_loss`` like every stage's)."""
        images = images.detach()
        taps = self.attention_taps
        with torch.no_grad(), (taps[1].capture() if taps else contextlib.nullcontext({})) as t_feats:
            teacher_out = self.teacher(images)
        targets = teacher_out.logits.argmax(dim=1)
        batch = Batch(images, targets, torch.arange(len(images), device=images.device))
        if self.method in ("dafl", "noise"):
            _, losses = self.distiller(batch, teacher_out)
            self.check_finite(losses, epoch, step)
            self.optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            self.optimizer.step()
            return {**losses, "loss": sum(losses.values())}
        with (taps[0].capture() if taps else contextlib.nullcontext({})) as s_feats:
            logits, _ = self.distiller(batch, teacher_out)  # through the (DDP) distiller: gradients are reduced
        disc = discrepancy_l1 if self.method == "dfad" else kl_discrepancy
        losses = {"discrepancy": disc(teacher_out.logits, logits)}
        if taps:
            losses["attention"] = self.attention_weight * zskt_attention(
                [s_feats[p] for p in taps[0].points], [t_feats[p] for p in taps[1].points])
        self.check_finite(losses, epoch, step)
        self.optimizer.zero_grad(set_to_none=True)
        loss = sum(losses.values())
        loss.backward()
        self.optimizer.step()
        return {**losses, "loss": loss}

    def iteration(self, epoch: int, step: int) -> dict[str, torch.Tensor]:
        """One iteration of the method; returns its named losses (detached)."""
        logged: dict[str, torch.Tensor] = {}
        if self.method == "noise":
            images = self.draw()
            logged.update(self.student_update(images, epoch, step))
        elif self.method == "dafl":
            images = self.draw()
            out = self.teacher_forward(images)
            feats = next(iter(out.features.values())) if out.features else out.logits
            parts = dafl_generator_loss(out.logits, feats.flatten(1), self.alpha, self.beta)
            self.check_finite(parts, epoch, step)
            self.generator_update(parts["generator"])
            logged.update({f"generator_{k}" if k != "generator" else k: v for k, v in parts.items()})
            logged.update(self.student_update(images, epoch, step))
        else:
            for _ in range(self.student_steps):
                with torch.no_grad():
                    images = self.draw()
                logged.update(self.student_update(images, epoch, step))
            student = unwrap(self.distiller).student
            for _ in range(self.generator_steps):
                images = self.draw()
                with frozen(student):
                    t_logits = self.teacher_forward(images).logits
                    disc = discrepancy_l1 if self.method == "dfad" else kl_discrepancy
                    gen_loss = -disc(t_logits, student(images))
                self.check_finite({"generator": gen_loss}, epoch, step)
                self.generator_update(gen_loss)
                logged["generator"] = gen_loss
        self.last_images = images.detach()
        return {k: v.detach() for k, v in logged.items()}

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.distiller.train()
        unwrap(self.distiller).set_epoch(epoch)
        if self.generator is not None:
            self.generator.train()
        self.noise.manual_seed(epoch_seed(self.noise_seed, epoch))
        sums: dict[str, float] = {}
        for step in range(self.steps_per_epoch):
            for k, v in self.iteration(epoch, step).items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return {f"train_{k}": v / max(self.steps_per_epoch, 1) for k, v in sums.items()}
