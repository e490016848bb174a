"""Optimizers and learning-rate schedules from plain arguments (the orchestrator maps config to these)."""
from __future__ import annotations

import torch

OPTIMIZERS = ("sgd", "adamw", "dot")
SCHEDULES = ("constant", "step", "cosine")
OPTIMIZER_HELP = {
    "sgd": "SGD with Nesterov momentum (plain SGD when momentum is 0)",
    "adamw": "AdamW (decoupled weight decay)",
    "dot": "DOT, Zhao et al. ICCV 2023: SGD with momentum beta+delta on the KD gradient, beta-delta on the task "
           "(CE) gradient (train.dot_delta)",
}


def make_optimizer(params, name: str, lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                   dot_delta: float = 0.075):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "dot":
        return DOT(params, lr=lr, momentum=momentum, delta=dot_delta, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}")


class DOT(torch.optim.Optimizer):
    """Distillation-Oriented Trainer (Zhao et al., ICCV 2023): SGD with one momentum buffer per loss kind.

    The paper's observation: the task (CE) and the distillation losses pull against each other and the student
    ends in a trade-off; giving the distillation gradient the larger momentum (``beta + delta``) and the task
    gradient the smaller (``beta - delta``) lets the distillation loss dominate the optimisation direction and
    reach flatter minima. With ``delta = 0`` the two buffers add up to ordinary (heavy-ball, not Nesterov) SGD
    momentum of the summed gradient, by linearity. Default ``delta = 0.075`` as in the paper's CIFAR-100 runs
    and mdistiller's ``DOT.DELTA``.

    The step needs the two gradients apart: the training loop calls ``backward`` on the KD losses,
    :meth:`step_kd` (which moves those gradients aside), ``backward`` on the task loss, then :meth:`step`
    (which refuses to run without :meth:`step_kd` first: a scheme's own loop that backwards the summed loss
    once would otherwise get plain momentum silently). kdray's ``TrainLoop.step`` does this; the loops of the
    schemes that override it (adversarial, quantized, lifelong, data-free, graph) do not.
    Per parameter ``p`` with task gradient ``g`` and KD gradient ``k``::

        b_task <- (beta - delta) * b_task + (g + weight_decay * p)     # b = gradient at the first step
        b_kd   <- (beta + delta) * b_kd   + k
        p      <- p - lr * (b_task + b_kd)

    A parameter reached by one loss only (a connector reached by the KD loss, a head by CE only) has nothing to
    trade off: its one buffer takes the middle momentum ``beta`` (plain SGD momentum), and weight decay goes with
    whichever gradient it has; mdistiller does the same. No dampening, no Nesterov.
    """

    splits_task_and_kd = True  # the loop's cue to backward the task and KD losses separately

    def __init__(self, params, lr: float, momentum: float = 0.9, delta: float = 0.075, weight_decay: float = 0.0):
        if not (0 <= delta <= momentum and momentum + delta < 1):
            raise ValueError(f"DOT needs 0 <= dot_delta <= momentum and momentum + dot_delta < 1 "
                             f"(got momentum {momentum}, dot_delta {delta})")
        super().__init__(params, dict(lr=lr, momentum=momentum, delta=delta, weight_decay=weight_decay))
        self._kd_grads: dict[torch.Tensor, torch.Tensor] = {}
        self._kd_taken = False  # step_kd ran for this step (a loop that backwards once never calls it)

    @torch.no_grad()
    def step_kd(self) -> None:
        """Take the gradients now in ``.grad`` as the distillation gradients and clear ``.grad`` for the task
        backward that follows."""
        self._kd_grads = {}
        self._kd_taken = True
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._kd_grads[p] = p.grad
                    p.grad = None

    @torch.no_grad()
    def step(self, closure=None):
        if not self._kd_taken:
            raise RuntimeError("train.optimizer: dot needs the KD and CE gradients apart, but this stage's training "
                               "step backwards their sum once (no step_kd call); use train.optimizer: sgd here")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta, delta, wd, lr = group["momentum"], group["delta"], group["weight_decay"], group["lr"]
            for p in group["params"]:
                task, kd = p.grad, self._kd_grads.pop(p, None)
                if task is None and kd is None:
                    continue
                both = task is not None and kd is not None
                state = self.state[p]
                update = torch.zeros_like(p)
                for key, grad, momentum, decays in (
                        ("task_momentum", task, beta - delta if both else beta, True),
                        ("kd_momentum", kd, beta + delta if both else beta, task is None)):
                    if grad is None:
                        continue
                    if wd and decays:
                        grad = grad.add(p, alpha=wd)
                    buf = state.get(key)
                    if buf is None:
                        buf = state[key] = grad.clone()
                    else:
                        buf.mul_(momentum).add_(grad)
                    update.add_(buf)
                p.add_(update, alpha=-lr)
        self._kd_grads = {}
        self._kd_taken = False
        return loss


def make_schedule(optimizer, name: str, epochs: int, milestones: list[int] | None = None, gamma: float = 0.1):
    """Per-epoch schedule: ``step`` decays by ``gamma`` at ``milestones``; ``cosine`` anneals to 0."""
    if name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _epoch: 1.0)
    if name == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones or [], gamma=gamma)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    raise ValueError(f"unknown schedule {name!r}; allowed: {', '.join(SCHEDULES)}")
