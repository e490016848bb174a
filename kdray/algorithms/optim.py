"""Optimizers and learning-rate schedules from plain arguments (the orchestrator maps config to these)."""
from __future__ import annotations

import torch

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "step", "cosine")


def make_optimizer(params, name: str, lr: float, weight_decay: float = 0.0, momentum: float = 0.9):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}")


def make_schedule(optimizer, name: str, epochs: int, milestones: list[int] | None = None, gamma: float = 0.1):
    """Per-epoch schedule: ``step`` decays by ``gamma`` at ``milestones``; ``cosine`` anneals to 0."""
    if name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _epoch: 1.0)
    if name == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones or [], gamma=gamma)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    raise ValueError(f"unknown schedule {name!r}; allowed: {', '.join(SCHEDULES)}")
