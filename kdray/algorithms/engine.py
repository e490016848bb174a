"""The training loop: pure PyTorch, the same in a unit test, in-process and inside a Ray Train worker.

It runs epochs of distillation steps and an evaluation per epoch, and hands each epoch's metrics to
callbacks. Checkpointing, reporting to Ray and logging to MLflow are callbacks the orchestrator
supplies; the loop knows nothing of them. How a step uses the hardware (``precision``, ``channels_last``,
``compile``) is an argument of the loop; the mechanics live in :mod:`kdray.algorithms.precision`.
"""
from __future__ import annotations

import random
import time
from collections.abc import Mapping
from typing import Iterable, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from kdray.algorithms import precision as prec
from kdray.algorithms.base import Batch
from kdray.algorithms.distiller import Distiller, Teacher, call_model


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; training stops instead of writing garbage checkpoints."""


class Callback(Protocol):
    def on_epoch_end(self, epoch: int, metrics: dict[str, float], loop: "TrainLoop") -> None: ...


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, torch.Tensor]:
    """RNG states as tensors, so checkpoints load with ``torch.load(weights_only=True)``."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": torch.tensor([np_state[2], np_state[3]], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_state[4]], dtype=torch.float64),
        "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    pos, has_gauss = state["numpy_pos"].tolist()
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss,
                         float(state["numpy_gauss"].item())))
    random.setstate((3, tuple(state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def _to_batch(raw, device, channels_last: bool = False) -> Batch:
    x, y, idx = raw
    if isinstance(x, Mapping):  # inputs in several modalities (a cross-modal dataset): each tensor moved
        x = {k: v.to(device, non_blocking=True) for k, v in x.items()}
    else:
        x = x.to(device, non_blocking=True)
    return Batch(prec.channels_last_input(x) if channels_last else x, y.to(device, non_blocking=True),
                 idx.to(device))


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device, num_classes: int, reduce: bool = True,
             precision: str = "fp32", channels_last: bool = False) -> dict[str, float]:
    """Top-1 (and top-5 when there are more than 5 classes) accuracy and CE loss; with ``reduce`` the
    counts are summed across ranks (each rank evaluated a disjoint shard). ``precision`` / ``channels_last``:
    the forward under the training step's autocast and memory format; the CE is taken in fp32."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # n, correct1, correct5, loss_sum
    for raw in loader:
        batch = _to_batch(raw, device, channels_last)
        with prec.autocast(device, precision):
            logits = call_model(model, batch.inputs)
        logits, targets = prec.full_precision(logits), batch.targets
        if logits.dim() > 2 or bool((targets == -100).any()):  # per-token labels (masked LM), -100: no label
            logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
            keep = targets != -100
            logits, targets = logits[keep], targets[keep]
        totals[0] += targets.numel()
        totals[3] += F.cross_entropy(logits, targets, reduction="sum").double()
        topk = logits.topk(min(5, logits.shape[-1]), dim=1).indices
        hit = topk == targets[:, None]
        totals[1] += hit[:, 0].sum()
        totals[2] += hit.any(dim=1).sum()
    model.train(was_training)
    n, c1, c5, loss = (_all_reduce_sum(totals) if reduce else totals).tolist()
    if n == 0:  # an empty split (e.g. val_fraction: 0) has no accuracy: NaN, not a misleading 0.0
        n = c1 = c5 = loss = float("nan")
    out = {"top1": c1 / n, "loss": loss / n}
    if num_classes > 5:
        out["top5"] = c5 / n
    return out


class TrainLoop:
    """Owns one training stage: the trainable distiller (maybe DDP-wrapped), the teacher, optimizer and schedule.

    How a step uses the hardware (defaults change nothing):

    * ``precision`` (``fp32`` | ``bf16`` | ``fp16``): the teacher forward and the student step (forward and
      the knowledge terms' inputs) run under ``torch.autocast`` with that dtype; ``fp16`` adds a
      :class:`torch.amp.GradScaler` for the device type (its state is checkpointed). Weights, optimizer
      state and every term's loss arithmetic stay fp32 (``KnowledgeTerm.__call__``). bf16 on a CPU is a
      correctness mode, not a speed-up: see ``bench/precision.py``.
    * ``channels_last``: the distiller (student and connectors) and the teacher are converted to
      ``torch.channels_last`` here, and 4-D inputs too, each step. Convert before DDP wraps the distiller
      (:func:`kdray.algorithms.precision.to_channels_last`): DDP lays out its gradient buckets by the
      parameters' strides; converting again here is then a no-op.
    * ``compile``: ``torch.compile`` the student model(s) and the teacher's model(s) in place
      (``Module.compile``: state-dict keys and the feature hooks unchanged; the terms stay eager). It costs
      start-up, measured on this project's shared 2-core CPU box (torch 2.14.1): the first compiled step of
      ``resnet56`` -> ``resnet20`` (KD, batch 32, cold inductor cache, a loaded machine) took 204 s against
      5 s for the first eager step, for a steady-state step 0.89x fp32's (``bench/precision.py``; an earlier
      quieter measurement of resnet20 alone: 24-32 s); a tiny ``digits_cnn`` 16 -> 8 FitNet step 20-45 s
      cold, 3 s with a warm cache. One more compilation follows when the batch shape changes (the last,
      smaller batch; evaluation) and for eval mode. Worth it for long runs on a GPU, rarely for a few CPU
      epochs.
    """

    def __init__(self, distiller: nn.Module, teacher: Teacher | None, optimizer, scheduler, train_loader,
                 val_loader, num_classes: int, epochs: int, device, callbacks: list[Callback] | None = None,
                 eval_model: nn.Module | None = None, eval_reduce: bool = True, precision: str = "fp32",
                 channels_last: bool = False, compile: bool = False):
        self.precision = prec.check_precision(precision)
        self.channels_last = channels_last
        self.compile = compile
        self.scaler = prec.grad_scaler(device, precision)
        if getattr(optimizer, "splits_task_and_kd", False):
            if self.scaler.is_enabled():
                raise ValueError("train.optimizer: dot cannot run with precision: fp16 (one GradScaler step over "
                                 "two backward passes); use precision: bf16 or fp32")
            if isinstance(distiller, nn.parallel.DistributedDataParallel):
                raise ValueError("train.optimizer: dot cannot run data-parallel (DDP syncs one backward per "
                                 "forward, DOT needs two); use ray.num_workers: 1 or 0")
        if channels_last:
            prec.to_channels_last(distiller)
            if teacher is not None:
                prec.to_channels_last(teacher)
        if compile:
            for model in compile_targets(distiller) + compile_targets(teacher):
                prec.compile_in_place(model)
        self.distiller = distiller
        self.teacher = teacher
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.num_classes = num_classes
        self.epochs = epochs
        self.device = device
        self.callbacks = list(callbacks or [])
        self.eval_model = eval_model if eval_model is not None else _inner(distiller).student
        self.eval_reduce = eval_reduce
        self.epoch = 0  # next epoch to run
        self.history: list[dict[str, float]] = []

    # --- checkpoint state -------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {
            "distiller": _inner(self.distiller).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": torch.tensor(self.epoch),
            "rng": rng_state(),
        }
        if self.scaler.is_enabled():  # fp16: the loss scale and its growth tracker (plain numbers)
            state["grad_scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        _inner(self.distiller).load_state_dict(state["distiller"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = int(state["epoch"])
        set_rng_state(state["rng"])
        if self.scaler.is_enabled() and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])

    # --- the loop ---------------------------------------------------------------------------
    def step(self, batch: Batch, epoch: int = 0, step: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimisation step on a batch already on the device (and in the memory format): teacher forward
        and student step under the loop's autocast, the NaN guard, backward through the (maybe disabled)
        gradient scaler, the optimizer step. Returns the total loss and the named losses. An optimizer with
        ``splits_task_and_kd`` (DOT) gets the gradients apart: backward of the KD losses, its ``step_kd``,
        backward of ``ce``, its ``step`` (refused with fp16 and DDP at construction)."""
        with prec.autocast(self.device, self.precision):  # teacher and student alike; terms run in fp32
            # A teacher source with ``wants_batch`` (a cache looked up by sample index) gets the whole batch.
            # No term needing a teacher (CS-KD, mean teacher): its forward is skipped.
            teacher_out = (None if self.teacher is None or not wants_teacher(self.distiller) else
                           self.teacher(batch if getattr(self.teacher, "wants_batch", False) else batch.inputs))
            _logits, losses = self.distiller(batch, teacher_out)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            bad = [k for k, v in losses.items() if not torch.isfinite(v)]
            raise NonFiniteLossError(
                f"non-finite loss at epoch {epoch} step {step}: term(s) {bad} = "
                f"{[float(losses[k].detach()) for k in bad]}; lower the lr or the term's weight"
            )
        self.optimizer.zero_grad(set_to_none=True)
        if getattr(self.optimizer, "splits_task_and_kd", False):  # DOT: the KD and task gradients apart
            kd = [v for k, v in losses.items() if k != "ce"]
            if kd:
                sum(kd).backward(retain_graph="ce" in losses)
            self.optimizer.step_kd()
            if "ce" in losses:
                losses["ce"].backward()
            self.optimizer.step()
            return loss, losses
        self.scaler.scale(loss).backward()  # disabled scaler (fp32, bf16): plain backward and step
        self.scaler.step(self.optimizer)
        self.scaler.update()
        inner = _inner(self.distiller)
        if isinstance(inner, Distiller):
            inner.after_step()  # the terms' post-step updates (the mean teacher's EMA)
        return loss, losses

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.distiller.train()
        _inner(self.distiller).set_epoch(epoch)
        for sampler in (getattr(self.train_loader, "sampler", None), getattr(self.train_loader, "batch_sampler", None)):
            if hasattr(sampler, "set_epoch"):  # a batch sampler too: CS-KD's class pairs
                sampler.set_epoch(epoch)
        sums: dict[str, float] = {}
        steps = 0
        for step, raw in enumerate(self.train_loader):
            loss, losses = self.step(_to_batch(raw, self.device, self.channels_last), epoch, step)
            steps += 1
            # Per-teacher values of multi-teacher feature terms (``fitnet_t0``, ...): logged, not summed.
            for k, v in {**losses, **getattr(_inner(self.distiller), "member_losses", {})}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
        return {f"train_{k}": v / max(steps, 1) for k, v in sums.items()}

    def evaluate_split(self, loader) -> dict[str, float]:
        """Accuracy and loss of the evaluated model on one split (validation each epoch, the test at the end);
        a loop whose model reads more than a batch (a graph) overrides it."""
        return evaluate(self.eval_model, loader, self.device, self.num_classes, self.eval_reduce, self.precision,
                        self.channels_last)

    def evaluate_test(self, loader) -> dict[str, float]:
        """The final test: :meth:`evaluate_split`, plus what a loop reports once, after training (a graph loop's
        top-1 by node structure)."""
        return self.evaluate_split(loader)

    def run(self) -> list[dict[str, float]]:
        """Train from ``self.epoch`` to ``self.epochs``, evaluating and calling back after each epoch."""
        while self.epoch < self.epochs:
            epoch = self.epoch
            start = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            metrics = self.train_epoch(epoch)
            self.scheduler.step()
            metrics.update({f"val_{k}": v for k, v in self.evaluate_split(self.val_loader).items()})
            metrics["lr"] = lr
            metrics["epoch_time_s"] = time.perf_counter() - start
            metrics["epoch"] = epoch
            self.epoch = epoch + 1
            self.history.append(metrics)
            for cb in self.callbacks:
                cb.on_epoch_end(epoch, metrics, self)
        return self.history


def compile_targets(module: nn.Module | None) -> list[nn.Module]:
    """The networks ``compile`` compiles: a distiller's ``student`` (an online cohort's ``peers`` / ``peer``),
    each frozen :class:`Teacher`'s ``model`` (one, or an ensemble's); never the terms (small, data-dependent
    control flow) and nothing of a cached teacher (a table lookup)."""
    if module is None:
        return []
    teachers = [m.model for m in module.modules() if isinstance(m, Teacher)]
    if teachers:
        return teachers
    inner = _inner(module)
    for name in ("student", "peers", "peer"):
        found = getattr(inner, name, None)
        if isinstance(found, nn.Module):
            return [found]
        if isinstance(found, (list, tuple)) and found and all(isinstance(m, nn.Module) for m in found):
            return list(found)
    return []


def wants_teacher(module: nn.Module) -> bool:
    """Whether a step of this (maybe wrapped) distiller reads the teacher's output: ``False`` only for a
    :class:`Distiller` whose terms all have ``needs_teacher = False`` (other trainables always get it)."""
    inner = _inner(module)
    terms = getattr(inner, "terms", None) if isinstance(inner, Distiller) else None
    return not terms or any(t.needs_teacher for t in terms)


def _inner(module: nn.Module) -> Distiller:
    while not isinstance(module, Distiller) and hasattr(module, "module"):
        module = module.module
    return module
