"""The training loop of one LM stage (a teacher on CE, a scratch student, a distilled student): epochs of
:func:`kdray.algorithms.lm.step.lm_step_losses` and a held-out report after each, resumable at any epoch end.

Pure PyTorch like the image :class:`~kdray.algorithms.engine.TrainLoop`; the orchestrator supplies the batches,
the callbacks (per-step losses and per-epoch rows to MLflow, checkpoints) and stores :meth:`state_dict`.
``batches(epoch)`` must return the same ``(input_ids, completion_mask)`` batches for the same epoch (seed it by
epoch; a third item, the batch's :class:`~kdray.algorithms.lm.topk.TeacherTopK` read from a cache, replaces the
teachers), so a run resumed from an epoch's end trains exactly as one that never stopped; the on-policy source's
generator is part of the state for the same reason.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn

from kdray.algorithms.lm.on_policy import OnPolicySource
from kdray.algorithms.lm.step import LMLossSettings, held_out_figures, lm_step_losses

Batches = Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]


class LMTrainLoop:
    """Trains ``student`` for ``epochs``; after each epoch ``held_out`` (ids, mask) gives ``val_perplexity``,
    ``val_top1`` and, with teachers, ``val_perplexity_under_teacher`` (the first teacher's distribution).

    ``on_step(step, losses)`` sees the named float losses of every ``log_every_steps``-th step; ``on_epoch(row)``
    each epoch's row, after which the state is complete (checkpoint there). A non-finite loss stops the run with
    the loss's name, as the image loop's NaN guard does."""

    def __init__(self, student: nn.Module, optimizer: torch.optim.Optimizer, batches: Batches, epochs: int,
                 settings: LMLossSettings, held_out: tuple[torch.Tensor, torch.Tensor] | None = None,
                 teachers: list[nn.Module] = (), source: OnPolicySource | None = None,
                 log_every_steps: int = 50, grad_clip: float | None = None,
                 on_step: Callable[[int, dict], None] | None = None, on_epoch: Callable[[dict], None] | None = None):
        if epochs < 1 or log_every_steps < 1:
            raise ValueError(f"LM loop: epochs and log_every_steps must be >= 1, got {epochs}, {log_every_steps}")
        self.student, self.optimizer, self.batches, self.epochs = student, optimizer, batches, epochs
        self.settings, self.held_out, self.teachers, self.source = settings, held_out, list(teachers), source
        self.log_every_steps, self.grad_clip = log_every_steps, grad_clip
        self.on_step, self.on_epoch = on_step, on_epoch
        self.epoch, self.step, self.rows = 0, 0, []
        for teacher in self.teachers:
            teacher.eval()
            teacher.requires_grad_(False)

    def train_epoch(self) -> dict:
        self.student.train()
        totals, count = {}, 0
        for input_ids, completion_mask, *cached in self.batches(self.epoch):
            losses, _ = lm_step_losses(self.student, input_ids, completion_mask, self.settings, self.teachers,
                                       cached_topk=cached[0] if cached else None, source=self.source)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"LM loss {'/'.join(losses)} is {loss.item()} at step {self.step}; "
                                         "lower the learning rate or the temperature")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.grad_clip is not None:
                nn.utils.clip_grad_norm_(self.student.parameters(), self.grad_clip)
            self.optimizer.step()
            values = {name: value.item() for name, value in losses.items()}
            for name, value in values.items():
                totals[name] = totals.get(name, 0.0) + value
            count += 1
            self.step += 1
            if self.on_step is not None and self.step % self.log_every_steps == 0:
                self.on_step(self.step, values)
        if count == 0:
            raise ValueError(f"LM loop: epoch {self.epoch} has no batches; the training split is empty")
        row = {"epoch": self.epoch + 1, **{f"train_{name}": total / count for name, total in totals.items()}}
        if self.held_out is not None:
            teacher = self.teachers[0] if self.teachers else None
            row.update({f"val_{k}": v for k, v in held_out_figures(self.student, *self.held_out, teacher).items()})
        return row

    def run(self) -> list[dict]:
        """Train the remaining epochs; returns every epoch's row (those before a resume included)."""
        while self.epoch < self.epochs:
            row = self.train_epoch()
            self.epoch += 1
            self.rows.append(row)
            if self.on_epoch is not None:
                self.on_epoch(row)
        return self.rows

    def state_dict(self) -> dict:
        """Tensors and plain values only (loadable with ``torch.load(weights_only=True)``)."""
        state = {"epoch": self.epoch, "step": self.step, "rows": [dict(r) for r in self.rows],
                 "student": self.student.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.source is not None:
            state["source_generator"] = self.source.generator.get_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step, self.rows = state["epoch"], state["step"], [dict(r) for r in state["rows"]]
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.source is not None:
            self.source.generator.set_state(state["source_generator"])
