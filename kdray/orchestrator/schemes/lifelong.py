"""lifelong: class-incremental learning over a task sequence (``lifelong.tasks``, default digits 0-4 then 5-9);
the frozen model of task t-1 teaches on task t's data (LwF, iCaRL), beside the fine-tuning baseline.

The plan: per seed, one stage per method of ``lifelong.methods`` with the *whole* task sequence inside it (one
MLflow run per (seed, method)). Why not a stage per (method, task): a task's teacher is the previous task's
model and iCaRL's exemplar memory passes from task to task; inside one stage both are loop state, in the
stage's checkpoints (so a job resumed mid-sequence continues inside the stage, with the memory and the
old model restored), and the accuracy matrix, the average accuracy and the forgetting belong to one run.
The run holds per-epoch metrics, each matrix entry as ``acc_task{j}_after{t}`` (at the step of task t's last
epoch), ``average_accuracy`` / ``forgetting`` at the last epoch (iCaRL also its nearest-mean-of-exemplars
matrix, ``nme_acc_task{j}_after{t}``), and the matrix as the heatmap artifact ``accuracy_matrix.png``
(rewritten after each task). The mathematics are :mod:`kdray.algorithms.lifelong`;
this module cuts the splits by class and runs the loop through the common stage machinery
(:func:`~kdray.orchestrator.job.prepare_stage` / ``complete_stage``). No pre-trained teacher is read, and the
``baseline`` (scratch) stage is not planned: ``finetune`` is the baseline.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from kdray.algorithms.lifelong import LifelongLoop
from kdray.config import ConfigError
from kdray.data.device import split_base
from kdray.models.features import FeaturePathError, default_points
from kdray.orchestrator.build import build_optimizer, worker_cpus
from kdray.orchestrator.callbacks import Progress
from kdray.orchestrator.job import complete_stage, prepare_stage
from kdray.orchestrator.placement import make_loaders
from kdray.orchestrator.plan import Scheme, no_teacher, register_scheme, stage


def split_labels(dataset) -> torch.Tensor:
    """The labels of a split, in order: read from the base tensors / ``targets`` when the split is a view of
    them (digits, CIFAR), else item by item."""
    base, indices = split_base(dataset)
    if isinstance(base, TensorDataset):
        labels = base.tensors[1]
    elif hasattr(base, "targets"):
        labels = torch.as_tensor(base.targets)
    else:
        return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)
    labels = labels.long()
    return labels if indices is None else labels[torch.as_tensor(indices)]


def of_classes(labels: torch.Tensor, classes) -> torch.Tensor:
    """The positions of the samples whose label is in ``classes``."""
    return torch.isin(labels, torch.as_tensor(list(classes), dtype=torch.long)).nonzero().flatten()


def check_tasks(cfg, num_classes: int, dataset: str) -> None:
    for t, classes in enumerate(cfg.lifelong.tasks):
        bad = [c for c in classes if c >= num_classes]
        if bad:
            raise ConfigError(f"lifelong.tasks: task {t} names class {bad[0]}, but dataset {dataset!r} has classes "
                              f"0 .. {num_classes - 1}; name only labels the dataset has")


def accuracy_heatmap(acc, method: str):
    from kdray.orchestrator.plots import accuracy_matrix

    return accuracy_matrix(acc.tolist(), f"{method}: test top-1 per task")


class LogAccuracyMatrix:
    """Epoch-end callback (rank 0, where a stage logs): after each task, the accuracy matrix so far as the
    heatmap ``accuracy_matrix.png`` of the stage's run (a replayed task rewrites the same file)."""

    def __init__(self, logger, method: str):
        self.logger, self.method = logger, method

    def on_epoch_end(self, epoch, metrics, loop):
        if (epoch + 1) % loop.epochs_per_task == 0:
            self.logger.client.log_figure(self.logger.run_id, accuracy_heatmap(loop.acc, self.method),
                                          "accuracy_matrix.png")


@register_scheme
class Lifelong(Scheme):
    name = "lifelong"
    help = ("class-incremental tasks learnt in sequence (lifelong.tasks), the previous task's model teaching: "
            "fine-tuning baseline, LwF, iCaRL (exemplars + distillation); accuracy matrix and forgetting")
    sections = ("lifelong",)
    searched_kind = "lifelong"  # a sweep scores the last of lifelong.methods (give it one: e.g. [lwf])

    def searched_kind_for(self, cfg):
        return cfg.lifelong.methods[-1]
    own_stage_kinds = ("finetune", "lwf", "icarl")

    def check(self, cfg):
        no_teacher(cfg)
        if "methods" in cfg.model_fields_set and cfg.methods:
            raise ValueError("scheme 'lifelong' takes its methods from lifelong.methods (finetune, lwf, icarl); "
                             "remove methods")
        cfg.__dict__["methods"] = []

    def plan(self, cfg):
        """Per seed, one stage per method over the whole task sequence."""
        return [stage(f"{method}-seed{seed}", method, seed, "student", cfg.student.model, methods=method)
                for seed in cfg.seeds for method in cfg.lifelong.methods]

    def preflight(self, cfg, splits, example, student, teachers, orders):
        check_tasks(cfg, splits.num_classes, cfg.data.name)
        labels = split_labels(splits.train)
        for t, classes in enumerate(cfg.lifelong.tasks):
            missing = [c for c in classes if not bool((labels == c).any())]
            if missing:
                raise ConfigError(f"lifelong.tasks: task {t} names class {missing[0]}, which has no training sample "
                                  f"in dataset {cfg.data.name!r}; name classes the training split holds")
        if "icarl" in cfg.lifelong.methods and cfg.lifelong.selection == "herding":
            try:
                default_points(student, "embedding", "student")
            except FeaturePathError as err:
                raise ConfigError(f"lifelong.selection: herding reads the student's embedding: {err}; or use "
                                  f"selection: random") from None

    def run_stage(self, cfg, stage, splits, ctx, job_state, resume_loop):
        spec = cfg.lifelong
        check_tasks(cfg, splits.num_classes, cfg.data.name)
        parts = prepare_stage(cfg, stage, splits, ctx, job_state)
        epochs_per_task = spec.epochs_per_task or cfg.train.epochs
        optim = cfg.train.model_copy(update={"epochs": epochs_per_task})
        train_labels, val_labels, test_labels = (split_labels(s) for s in (splits.train, splits.val, splits.test))
        loader_options = dict(loader_workers=cfg.data.loader_workers, pipeline=cfg.data.pipeline,
                              cpus=worker_cpus(cfg))

        def loaders(train_idx, eval_split=None, eval_idx=None):
            view = replace(splits, train=Subset(splits.train, train_idx.tolist()))
            if eval_split is not None:
                view = replace(view, val=Subset(getattr(splits, eval_split), eval_idx.tolist()))
            return make_loaders(view, optim.batch_size, stage.seed, ctx, **loader_options)

        some = torch.arange(min(len(splits.train), 1))

        def train_loader_for(indices):
            return loaders(indices)[0]

        def val_loader_for(classes):
            return loaders(some, "val", of_classes(val_labels, classes))[1]

        test_loaders = [loaders(some, "test", of_classes(test_labels, classes))[1] for classes in spec.tasks]

        def feature_loader_for(indices):
            return DataLoader(Subset(splits.train, indices.tolist()), batch_size=256)

        def new_optimizer():
            return build_optimizer((p for p in parts.trainable.parameters() if p.requires_grad), optim)

        total = len(spec.tasks) * epochs_per_task
        for cb in parts.callbacks:
            if isinstance(cb, Progress):
                cb.epochs = total  # "epoch k/N" over the whole sequence
        if parts.logger is not None:
            parts.callbacks.insert(0, LogAccuracyMatrix(parts.logger, stage.kind))
        kwargs = {**parts.loop_kwargs(splits, ctx), "epochs": total}
        loop = LifelongLoop(method=stage.kind, tasks=spec.tasks, epochs_per_task=epochs_per_task,
                            task_samples=[of_classes(train_labels, c) for c in spec.tasks], labels=train_labels,
                            train_loader_for=train_loader_for, val_loader_for=val_loader_for,
                            test_loaders=test_loaders, feature_loader_for=feature_loader_for,
                            new_optimizer=new_optimizer, exemplars_per_class=spec.exemplars_per_class,
                            selection=spec.selection, temperature=spec.temperature, lambda_old=spec.lambda_old,
                            seed=stage.seed, **kwargs)
        extra = {"lifelong_method": stage.kind}

        class Matrix:  # the result row gets the matrix and its summaries once the loop has run
            def on_epoch_end(self, epoch, metrics, loop):
                if epoch + 1 == loop.epochs:
                    extra.update(accuracy_matrix=loop.acc.tolist(), average_accuracy=metrics["average_accuracy"],
                                 forgetting=metrics["forgetting"])
                    if loop.method == "icarl":
                        extra.update(nme_accuracy_matrix=loop.nme_acc.tolist(),
                                     nme_average_accuracy=metrics["nme_average_accuracy"])

        loop.callbacks.append(Matrix())
        result = complete_stage(cfg, stage, splits, ctx, job_state, parts, loop, resume_loop, extra)
        return result
