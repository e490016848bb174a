"""Lifelong (class-incremental) distillation: a sequence of tasks, each a set of classes, learnt one after
another by one model; the frozen model of task t-1 teaches on task t's data.

The head is one output layer over all the dataset's classes, *masked to the classes seen so far*
(:func:`mask_unseen`): evaluation takes the arg-max over the seen classes only (a single masked head instead of
a head grown per task: the same outputs, simpler). Methods:

- ``finetune`` (the baseline, no distillation): cross-entropy over the *current task's* classes on its data
  (the old classes' outputs get no gradient from it, as LwF's fine-tuning baseline leaves the old tasks' heads
  alone; PyCIL's finetune / LwF do the same). Measured on digits: a cross-entropy over all seen classes instead
  drives the old classes' accuracy to 0 for fine-tuning *and* LwF alike (the softmax KD on the old classes is
  blind to how the old outputs compare with the new ones).
- ``lwf`` (Li & Hoiem, "Learning without Forgetting", ECCV 2016 / TPAMI 2017): the same cross-entropy plus
  ``lambda_old`` times LwF's knowledge-distillation loss (:func:`lwf_loss`) between the old model's and the
  model's outputs *on the old classes*, on the new task's data. Paper defaults: ``lambda_o = 1``, ``T = 2``.
  The paper's optional warm-up (training the new head alone first) is not implemented; the paper's
  multi-head, task-aware setting becomes here the single masked head of class-incremental learning.
- ``icarl`` (Rebuffi et al., "iCaRL", CVPR 2017): a memory of ``exemplars_per_class`` training samples of
  each old class, chosen by herding on the L2-normalised feature means (:func:`herding`; or ``random``),
  replayed with the new task's data; iCaRL's loss (:func:`icarl_loss`): sigmoid binary cross-entropy over the
  seen classes, one-hot targets for the new classes and the old model's sigmoid outputs for the old ones.
  Departures: the memory holds a fixed number per class (iCaRL: a fixed total ``K``, ``K / classes`` each,
  shrinking as classes arrive). The accuracy matrix is the classifier head's (the masked arg-max); iCaRL's own
  nearest-mean-of-exemplars classifier (:func:`class_means`, :func:`nme_predict`: the L2-normalised embedding
  nearest to the normalised mean of each seen class's exemplars) gives a second matrix, ``nme_acc_*``
  (without iCaRL's flipped-image augmentation of the means). Exemplars of a task's classes are chosen at the
  task's end (the memory then serves that task's NME row and the next tasks' replay).

The accuracy matrix ``acc[t][j]``: after training task ``t``, the top-1 on task ``j``'s test classes (arg-max
over the classes seen so far; a task not yet learnt scores 0 by construction). :func:`average_accuracy` is the
mean of its last row, :func:`forgetting` the mean over the old tasks of (best earlier accuracy - final one).

:class:`LifelongLoop` runs the whole sequence as one stage: ``epochs_per_task`` epochs per task, the task
switch (a fresh optimizer and schedule, the old model frozen, exemplars chosen) at the first epoch of each
task. Its checkpoint state adds the current task, the classes seen, the exemplar memory (indices into the
training split), the old model's weights and the accuracy matrix: tensors only, ``weights_only`` loadable, so
a run resumed mid-sequence ends with the weights of the uninterrupted one.
"""
from __future__ import annotations

import copy
import time
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from kdray.algorithms import precision as prec
from kdray.algorithms.base import Batch
from kdray.algorithms.engine import NonFiniteLossError, TrainLoop, evaluate
from kdray.models.features import FeatureTap, default_points, unwrap

METHODS = ("finetune", "lwf", "icarl")
SELECTIONS = ("herding", "random")
MASKED = -1e9  # the logit of a class not seen yet (finite: no NaN in a softmax or its gradient)


def mask_unseen(logits: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """``logits`` (fp32) with the classes not in the boolean mask ``seen`` set to a very low value."""
    return logits.float().masked_fill(~seen.to(logits.device), MASKED)


def lwf_loss(logits: torch.Tensor, old_logits: torch.Tensor, old_classes: torch.Tensor,
             temperature: float = 2.0) -> torch.Tensor:
    """LwF's ``L_old``: ``-sum_i y'_o(i) log yhat'_o(i)`` over the old classes, softened at ``temperature``
    (``y'`` the old model's, ``yhat'`` the model's softmax at T), batch mean. As in the paper, no ``T**2``
    factor."""
    old_classes = old_classes.to(logits.device)
    s = F.log_softmax(logits.float()[:, old_classes] / temperature, dim=1)
    t = F.softmax(old_logits.float()[:, old_classes] / temperature, dim=1)
    return -(t * s).sum(dim=1).mean()


def icarl_loss(logits: torch.Tensor, targets: torch.Tensor, seen: torch.Tensor, old_logits: torch.Tensor | None,
               old_classes: torch.Tensor) -> torch.Tensor:
    """iCaRL's classification + distillation loss: binary cross-entropy with logits summed over the seen
    classes, batch mean. Targets: one-hot labels on the new classes, ``sigmoid(old_logits)`` on the old ones
    (exemplars included: their label's class is an old class, so its target is the old model's output)."""
    logits = logits.float()
    goal = F.one_hot(targets, logits.shape[1]).float()
    if old_logits is not None and len(old_classes):
        old_classes = old_classes.to(logits.device)
        goal[:, old_classes] = torch.sigmoid(old_logits.float()[:, old_classes])
    cols = seen.nonzero().flatten().to(logits.device)
    bce = F.binary_cross_entropy_with_logits(logits[:, cols], goal[:, cols], reduction="sum")
    return bce / max(len(logits), 1)


def herding(features: torch.Tensor, count: int) -> torch.Tensor:
    """iCaRL's exemplar selection: the indices (in pick order) of ``count`` rows of ``features`` whose running
    mean best approximates the class mean. Features are L2-normalised; step ``k`` picks, among the rows not yet
    picked, the ``x`` minimising ``|| mu - (phi(x) + sum_{j<k} phi(p_j)) / k ||`` (ties: the lowest index)."""
    phi = F.normalize(features.double(), dim=1)
    mu = phi.mean(dim=0)
    picked: list[int] = []
    total = torch.zeros_like(mu)
    free = torch.ones(len(phi), dtype=torch.bool)
    for k in range(1, min(count, len(phi)) + 1):
        dist_k = (mu - (total + phi) / k).norm(dim=1).masked_fill(~free, float("inf"))
        pick = int(dist_k.argmin())
        picked.append(pick)
        free[pick] = False
        total += phi[pick]
    return torch.tensor(picked, dtype=torch.long)


def class_means(features: torch.Tensor, labels: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """iCaRL's class prototypes: per class of ``classes``, the mean of its L2-normalised ``features``,
    normalised again (one row per class, in ``classes``' order)."""
    phi = F.normalize(features.double(), dim=1)
    return F.normalize(torch.stack([phi[labels == c].mean(dim=0) for c in classes]), dim=1)


def nme_predict(features: torch.Tensor, means: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """Nearest mean of exemplars: the class (of ``classes``, the rows of ``means``) whose mean is nearest to
    each L2-normalised feature row."""
    nearest = torch.cdist(F.normalize(features.double(), dim=1), means.double()).argmin(dim=1)
    return torch.as_tensor(list(classes), dtype=torch.long)[nearest]


def average_accuracy(acc: torch.Tensor) -> float:
    """The mean over tasks of the accuracy after the last task (the matrix's last row)."""
    return float(acc[-1].mean())


def forgetting(acc: torch.Tensor) -> float:
    """Mean over the old tasks ``j < T-1`` of ``max_{t<T-1} acc[t][j] - acc[T-1][j]`` (0 for one task)."""
    last = len(acc) - 1
    if last < 1:
        return 0.0
    return float((acc[:last, :last].max(dim=0).values - acc[last, :last]).mean())


class SeenClasses(nn.Module):
    """The model with its outputs masked to the classes seen so far (what the loop evaluates)."""

    def __init__(self, model: nn.Module, num_classes: int):
        super().__init__()
        self.model = model
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool), persistent=False)

    def forward(self, x):
        return mask_unseen(self.model(x), self.seen)


def _broadcast(tensors: Iterable[torch.Tensor]) -> None:
    """Rank 0's values everywhere (exemplars and the old model's BatchNorm statistics agree across ranks)."""
    if dist.is_available() and dist.is_initialized():
        for t in tensors:
            dist.broadcast(t, 0)


def _sum_ranks(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
    return values


class LifelongLoop(TrainLoop):
    """A :class:`TrainLoop` over a task sequence; ``epochs`` must be ``len(tasks) * epochs_per_task``.

    What the caller supplies (the orchestrator builds them; the loop stays pure PyTorch):
    ``task_samples[t]``: the training-split indices of task t's classes; ``train_loader_for(indices)``: a
    shuffled (DDP-sharded) loader over those training samples; ``val_loader_for(classes)``: a validation loader
    on those classes; ``test_loaders[t]``: a test loader on task t's classes; ``feature_loader_for(indices)``:
    an unshuffled, unsharded loader over training samples (herding reads their features); ``new_optimizer()``:
    a fresh ``(optimizer, scheduler)`` for a task; ``labels``: the training split's labels."""

    def __init__(self, *, method: str, tasks: Sequence[Sequence[int]], epochs_per_task: int,
                 task_samples: Sequence[torch.Tensor], labels: torch.Tensor,
                 train_loader_for: Callable, val_loader_for: Callable, test_loaders: Sequence,
                 feature_loader_for: Callable, new_optimizer: Callable, exemplars_per_class: int = 20,
                 selection: str = "herding", temperature: float = 2.0, lambda_old: float = 1.0, seed: int = 0,
                 **loop_kwargs):
        if method not in METHODS:
            raise ValueError(f"lifelong method {method!r} is not one of {', '.join(METHODS)}")
        if selection not in SELECTIONS:
            raise ValueError(f"exemplar selection {selection!r} is not one of {', '.join(SELECTIONS)}")
        if loop_kwargs.get("epochs") != len(tasks) * epochs_per_task:
            raise ValueError(f"a lifelong loop runs {len(tasks)} tasks x {epochs_per_task} epochs, "
                             f"not epochs={loop_kwargs.get('epochs')}")
        student = unwrap(loop_kwargs["distiller"]).student
        self.masked = SeenClasses(student, loop_kwargs["num_classes"])
        loop_kwargs["eval_model"] = self.masked
        super().__init__(**loop_kwargs)
        self.masked.to(self.device)
        self.method, self.tasks = method, [list(map(int, t)) for t in tasks]
        self.epochs_per_task = epochs_per_task
        self.task_samples = [torch.as_tensor(s, dtype=torch.long) for s in task_samples]
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.train_loader_for, self.val_loader_for = train_loader_for, val_loader_for
        self.test_loaders, self.feature_loader_for = list(test_loaders), feature_loader_for
        self.new_optimizer = new_optimizer
        self.exemplars_per_class, self.selection = exemplars_per_class, selection
        self.temperature, self.lambda_old, self.seed = temperature, lambda_old, seed
        self.student = student
        self.task = -1  # the task being trained (-1: none yet)
        self.memory = torch.zeros(0, dtype=torch.long)  # exemplar indices into the training split
        self.old_model: nn.Module | None = None
        self.old_classes = torch.zeros(0, dtype=torch.long)
        n = len(self.tasks)
        self.acc = torch.full((n, n), float("nan"), dtype=torch.float64)
        self.nme_acc = self.acc.clone()  # iCaRL's nearest-mean-of-exemplars classifier

    # --- the task sequence -------------------------------------------------------------------
    @property
    def seen(self) -> torch.Tensor:
        return self.masked.seen

    def task_of(self, epoch: int) -> int:
        return epoch // self.epochs_per_task

    def select_exemplars(self, task: int) -> torch.Tensor:
        """The exemplars of ``task``'s classes, with the current model (herding) or at random."""
        picks = []
        for cls in self.tasks[task]:
            members = self.task_samples[task][self.labels[self.task_samples[task]] == cls]
            if self.selection == "random":
                g = torch.Generator().manual_seed(self.seed * 100_003 + task * 1009 + cls)
                picks.append(members[torch.randperm(len(members), generator=g)[: self.exemplars_per_class]])
                continue
            picks.append(members[herding(self.embed(self.feature_loader_for(members))[0], self.exemplars_per_class)])
        return torch.cat(picks) if picks else torch.zeros(0, dtype=torch.long)

    @torch.no_grad()
    def embed(self, loader) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's embedding (its ``kd_embedding``, flattened) of a loader's samples, in order, and their
        labels (CPU)."""
        tap = FeatureTap(self.student, default_points(self.student, "embedding", "student"), "student")
        was_training = self.student.training
        self.student.eval()
        out, labels = [], []
        try:
            for raw in loader:
                with tap.capture() as feats:
                    self.student(raw[0].to(self.device))
                out.append(next(iter(feats.values())).flatten(1).float().cpu())
                labels.append(raw[1].cpu())
        finally:
            tap.remove()
            self.student.train(was_training)
        if not out:
            return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
        return torch.cat(out), torch.cat(labels).long()

    def freeze_old_model(self) -> None:
        self.old_model = copy.deepcopy(self.student).eval()
        for p in self.old_model.parameters():
            p.requires_grad_(False)

    def enter_task(self, task: int) -> None:
        """Set up training on ``task`` (loaders, a fresh optimizer and schedule, the mask); the old model
        and the memory must already be in place."""
        self.task = task
        self.seen.zero_()
        for t in range(task + 1):
            self.seen[self.tasks[t]] = True
        self.old_classes = torch.tensor([c for t in range(task) for c in self.tasks[t]], dtype=torch.long)
        self.current = torch.zeros_like(self.seen)
        self.current[self.tasks[task]] = True
        samples = self.task_samples[task]
        if self.method == "icarl" and len(self.memory):
            samples = torch.cat([samples, self.memory])
        self.train_loader = self.train_loader_for(samples)
        self.val_loader = self.val_loader_for(self.seen.nonzero().flatten().tolist())
        self.optimizer, self.scheduler = self.new_optimizer()

    def start_task(self, task: int) -> None:
        """The task switch: the model that learnt ``task - 1`` is frozen as the teacher; then
        :meth:`enter_task`."""
        if task > 0 and self.method != "finetune":
            self.freeze_old_model()
            _broadcast(self.old_model.state_dict().values())
        self.enter_task(task)

    # --- checkpoint state -------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["lifelong"] = {"task": torch.tensor(self.task), "memory": self.memory.clone(),
                             "accuracy_matrix": self.acc.clone(), "nme_accuracy_matrix": self.nme_acc.clone()}
        if self.old_model is not None:
            state["lifelong"]["old_model"] = {k: v.detach().cpu() for k, v in self.old_model.state_dict().items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        extra = state["lifelong"]
        self.memory = extra["memory"].clone()
        self.acc = extra["accuracy_matrix"].clone()
        self.nme_acc = extra["nme_accuracy_matrix"].clone()
        if "old_model" in extra:
            self.freeze_old_model()
            self.old_model.load_state_dict(extra["old_model"])
        task = int(extra["task"])
        if task >= 0:
            self.enter_task(task)  # the optimizer and schedule objects the saved states load into
        super().load_state_dict(state)

    # --- the loop ---------------------------------------------------------------------------
    def losses(self, logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        old_logits = None
        if self.old_model is not None and len(self.old_classes):
            with torch.no_grad():
                old_logits = self.old_model(batch.inputs).float()
        if self.method == "icarl":
            return {"icarl": icarl_loss(logits, batch.targets, self.seen, old_logits, self.old_classes)}
        losses = {"ce": F.cross_entropy(mask_unseen(logits, self.current), batch.targets)}
        if self.method == "lwf" and old_logits is not None:
            losses["lwf"] = self.lambda_old * lwf_loss(logits, old_logits, self.old_classes, self.temperature)
        return losses

    def step(self, batch: Batch, epoch: int = 0, step: int = 0):
        with prec.autocast(self.device, self.precision):
            logits, _ = self.distiller(batch, None)  # through the (DDP) wrapper: gradients are reduced
        losses = self.losses(prec.full_precision(logits), batch)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"non-finite loss at epoch {epoch} step {step}: "
                                     f"{ {k: float(v) for k, v in losses.items()} }; lower train.lr")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss, losses

    def nme_row(self, task: int) -> dict[str, float]:
        """Row ``task`` of the nearest-mean-of-exemplars matrix (the memory holds every seen class by now)."""
        classes = self.seen.nonzero().flatten().tolist()
        feats, labels = self.embed(self.feature_loader_for(self.memory))
        means = class_means(feats, labels, classes)
        out = {}
        for j, loader in enumerate(self.test_loaders):
            test_feats, test_labels = self.embed(loader)  # this rank's shard: counts summed over ranks
            hits = (nme_predict(test_feats, means, classes) == test_labels).sum() if len(test_labels) else 0
            counts = _sum_ranks(torch.tensor([float(hits), float(len(test_labels))], device=self.device)).tolist()
            self.nme_acc[task, j] = counts[0] / counts[1] if counts[1] else float("nan")
            out[f"nme_acc_task{j}_after{task}"] = float(self.nme_acc[task, j])
        if task == len(self.tasks) - 1:
            out["nme_average_accuracy"] = average_accuracy(self.nme_acc)
            out["nme_forgetting"] = forgetting(self.nme_acc)
        return out

    def task_end(self, task: int) -> dict[str, float]:
        """Row ``task`` of the accuracy matrix (every task's test classes), as metrics; iCaRL: the exemplars of
        the task's classes join the memory and the NME classifier's row follows."""
        out = {}
        for j, loader in enumerate(self.test_loaders):
            top1 = evaluate(self.masked, loader, self.device, self.num_classes, self.eval_reduce,
                            self.precision, self.channels_last)["top1"]
            self.acc[task, j] = top1
            out[f"acc_task{j}_after{task}"] = top1
        if task == len(self.tasks) - 1:
            out["average_accuracy"] = average_accuracy(self.acc)
            out["forgetting"] = forgetting(self.acc)
        if self.method == "icarl":
            new = self.select_exemplars(task).to(self.device)
            _broadcast([new])  # on the device: NCCL broadcasts device tensors only
            self.memory = torch.cat([self.memory, new.cpu()])
            out.update(self.nme_row(task))
        return out

    def run(self) -> list[dict[str, float]]:
        """:meth:`TrainLoop.run` with the task switch before an epoch (so its ``lr`` is the new task's) and
        the accuracy-matrix row after a task's last epoch."""
        while self.epoch < self.epochs:
            epoch = self.epoch
            if self.task_of(epoch) != self.task:
                self.start_task(self.task_of(epoch))
            start = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            metrics = self.train_epoch(epoch)
            self.scheduler.step()
            metrics.update({f"val_{k}": v for k, v in evaluate(self.eval_model, self.val_loader, self.device,
                                                                self.num_classes, self.eval_reduce, self.precision,
                                                                self.channels_last).items()})
            if (epoch + 1) % self.epochs_per_task == 0:
                metrics.update(self.task_end(self.task))
            metrics.update(lr=lr, epoch_time_s=time.perf_counter() - start, epoch=epoch, task=self.task)
            self.epoch = epoch + 1
            self.history.append(metrics)
            for cb in self.callbacks:
                cb.on_epoch_end(epoch, metrics, self)
        return self.history
