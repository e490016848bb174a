"""Epoch-end callbacks the stage runners hand to :class:`~kdray.algorithms.engine.TrainLoop`.

Every runner (the offline/assistant/self stages in :mod:`kdray.orchestrator.job`, the online cohort in
:mod:`kdray.orchestrator.online`) checkpoints, reports progress and passes the user's callbacks the stage
the same way, so the three live here, once. ``ctx`` is the worker's
:class:`~kdray.orchestrator.placement.WorkerContext` (its checkpoints, its ``log``).
"""
from __future__ import annotations

from kdray.orchestrator.run_dir import Checkpoint, JobState


class Checkpointer:
    """Epoch-end callback: every ``every`` epochs, checkpoint the job state plus this stage's loop state,
    then flush the epoch metrics it covers to MLflow (never before: a restart would log them twice).
    The unflushed metrics ride in the checkpoint, so a crash right after it loses none; epochs that a restart
    replays are skipped by :class:`~kdray.orchestrator.tracking.StageLogger`. The last epoch is left to the
    stage end."""

    def __init__(self, ctx, job_state: JobState, stage: str, every: int, logger=None, loop_state=None):
        self.ctx, self.job_state, self.stage, self.every, self.logger = ctx, job_state, stage, every, logger
        self.loop_state = loop_state or (lambda loop: loop.state_dict())  # peer-parallel: every rank's state

    def on_epoch_end(self, epoch, metrics, loop):
        if self.logger is not None:
            self.logger.buffer(epoch, metrics)
        if (epoch + 1) % self.every or epoch + 1 >= loop.epochs:
            return
        pending = self.logger.pending() if self.logger is not None else []
        checkpoint = Checkpoint(self.job_state, self.stage, {**self.loop_state(loop), "mlflow_pending": pending})
        self.ctx.checkpoints.save(checkpoint.to_payload(), {**metrics, "stage": self.stage})
        if self.logger is not None:
            self.logger.flush()


class Progress:
    """Epoch-end callback: one progress line per epoch through the worker's log (rank 0 only)."""

    def __init__(self, ctx, stage: str, epochs: int):
        self.ctx, self.stage, self.epochs = ctx, stage, epochs

    def on_epoch_end(self, epoch, metrics, loop):
        self.ctx.log(f"[{self.stage}] epoch {epoch + 1}/{self.epochs}  loss {metrics['train_loss']:.4f}  "
                     f"val top1 {metrics['val_top1']:.4f}  {metrics['epoch_time_s']:.1f}s")


class WithStage:
    """Wraps a user's epoch callback so its metrics name the stage (``stage``, ``kind``) they belong to."""

    def __init__(self, callback, stage):
        self.callback, self.stage = callback, stage

    def on_epoch_end(self, epoch, metrics, loop):
        self.callback.on_epoch_end(epoch, {**metrics, "stage": self.stage.name, "kind": self.stage.kind}, loop)
