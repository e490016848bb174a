"""Block-wise supervised architecture search (DNA: Li et al., "Block-wisely Supervised Neural Architecture
Search with Knowledge Distillation", CVPR 2020), pure PyTorch.

The teacher is cut into blocks at named module paths (:func:`cut_teacher`); a candidate student block learns to
map the teacher's input of a block to the teacher's output of that block (:func:`train_block`, MSE), and is
scored by that loss on held-out data after a few epochs. The chosen blocks are assembled under a parameter
budget (:func:`assemble`) into a ``blockwise_student`` (:mod:`kdray.models.blockwise`), which is then distilled
end to end.

Paper defaults and where kdray departs:

- DNA trains one weight-sharing supernet per block (MBConv cells, 6 choices per layer, 4-7 layers per block),
  then ranks its sub-nets by block loss. kdray trains every candidate of a small space (width x depth x kernel
  of a plain conv block) independently, one Tune trial each: no weight sharing, so no ranking bias from shared
  weights, and affordable because the spaces are small.
- DNA's block loss is ``||Y_i - Y^_i||^2 / K`` (K: the number of output neurons), i.e. the MSE; it feeds the
  teacher's block input (not the student's previous block) to each block, as here. kdray's score is that MSE
  divided by the variance of the teacher's block output (:func:`relative_mse`), so that scores of different
  blocks are on one scale and can be summed for the assembly; DNA sums the raw per-block losses.
- When the candidate's width differs from the teacher block's output channels, a 1x1 conv + BN projects it to
  them, followed by a ReLU as the teacher's stages end (:func:`kdray.models.blockwise.candidate_block`); DNA's
  blocks end at the teacher's channel count too.
- DNA searches the assembly under a constraint with a traversal of the ranked block choices; kdray enumerates
  the product of the per-block choices exhaustively (exact; the spaces are small) subject to total parameters
  and, optionally, a latency limit on the sum of the candidates' measured latencies plus the head's (DNA's
  constraints are FLOPs / parameters; the summed latency table is how latency-aware NAS usually estimates it).
- Training: Adam; kdray's search defaults to lr 1e-2, batch 32, 10 epochs per candidate on the job's train split
  (DNA: Adam 2e-3, 20 epochs per supernet on ImageNet). Scores are taken in eval mode (BN running statistics).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.models.blockwise import BlockwiseStudent, block_name, candidate_block
from kdray.models.features import FeaturePathError, resolve_points, unwrap


class BlockCutError(ValueError):
    """Block cuts that do not match the teacher's modules."""


class BudgetError(ValueError):
    """A budget no assembly of the candidates fits."""


@dataclass
class BlockShape:
    """The interface of teacher block ``i``: channels in/out and the spatial down-sampling factor."""

    cin: int
    cout: int
    down: int
    in_shape: tuple
    out_shape: tuple


class TeacherBlocks:
    """A teacher cut at module paths ``cuts`` (shallow to deep): block ``i`` is the module at ``cuts[i]``,
    which must consume the previous block's output unchanged (the blocks chain); the head is what the teacher
    does after the last cut (run as the teacher's own forward with the last block's output replaced).

    Built by :func:`cut_teacher`, which checks the chain on an example batch."""

    def __init__(self, teacher: nn.Module, cuts: list[str]):
        self.teacher = unwrap(teacher)
        self.cuts = list(cuts)
        self.modules = [resolve_points(self.teacher, [c], "teacher")[c] for c in self.cuts]

    def block(self, i: int) -> nn.Module:
        return self.modules[i]

    def chained(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits computed block by block, then the head."""
        h = x
        for m in self.modules:
            h = m(h)
        return self.head(h, x)

    def head(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The teacher's layers after the last cut applied to ``h`` (``x``: an input of the batch's shape, run
        through the layers before the cut, whose output is then replaced by ``h``)."""
        handle = self.modules[-1].register_forward_hook(lambda _m, _i, _o: h)
        try:
            return self.teacher(x)
        finally:
            handle.remove()

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(input, output)`` of every block on the teacher's own forward of ``x``."""
        store: dict[int, tuple] = {}
        handles = [m.register_forward_hook(self._hook(i, store)) for i, m in enumerate(self.modules)]
        try:
            self.teacher(x)
        finally:
            for h in handles:
                h.remove()
        return [store[i] for i in range(len(self.modules))]

    @staticmethod
    def _hook(i, store):
        def fn(_m, inputs, output):
            store[i] = (inputs[0].detach(), output.detach())

        return fn

    def shapes(self, x: torch.Tensor) -> list[BlockShape]:
        out = []
        for xin, yout in self.features(x):
            if xin.dim() != 4 or yout.dim() != 4:
                raise BlockCutError(f"block cuts must be conv feature maps (N, C, H, W); got input "
                                    f"{tuple(xin.shape)} and output {tuple(yout.shape)}")
            down = xin.shape[-1] // yout.shape[-1]
            if down < 1 or xin.shape[-1] != yout.shape[-1] * down or xin.shape[-2] != yout.shape[-2] * down:
                raise BlockCutError(f"a block must keep or divide the spatial size by a whole factor; got "
                                    f"{tuple(xin.shape[-2:])} -> {tuple(yout.shape[-2:])}")
            out.append(BlockShape(int(xin.shape[1]), int(yout.shape[1]), int(down), tuple(xin.shape[1:]),
                                  tuple(yout.shape[1:])))
        return out


def cut_teacher(teacher: nn.Module, cuts: list[str], example: torch.Tensor) -> TeacherBlocks:
    """Cut ``teacher`` at ``cuts`` and check, on ``example``, that every path exists (else the nearest valid
    paths are named), that the cuts are in the order the teacher runs them, and that each block consumes the
    previous block's output unchanged. Each failure is one :class:`BlockCutError` line."""
    if not cuts:
        raise BlockCutError("blocks.cuts: give at least one module path of the teacher (e.g. stage1, stage2)")
    if len(set(cuts)) != len(cuts):
        raise BlockCutError(f"blocks.cuts: {cuts} repeats a module path")
    try:
        blocks = TeacherBlocks(teacher, cuts)
    except FeaturePathError as err:
        raise BlockCutError(f"blocks.cuts: {err}") from None
    calls: list[tuple[int, object, object]] = []

    def hook(i):
        def fn(_m, inputs, output):
            calls.append((i, inputs[0] if inputs else None, output))

        return fn

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(blocks.modules)]
    was_training = blocks.teacher.training
    blocks.teacher.eval()
    try:
        with torch.no_grad():
            blocks.teacher(example)
    finally:
        for h in handles:
            h.remove()
        blocks.teacher.train(was_training)
    order = [i for i, _, _ in calls]
    if sorted(set(order)) != list(range(len(cuts))) or len(order) != len(cuts):
        unseen = [cuts[i] for i in range(len(cuts)) if i not in order]
        raise BlockCutError(f"blocks.cuts: each cut must run exactly once in the teacher's forward; "
                            f"{unseen or [cuts[i] for i in set(order) if order.count(i) > 1]} "
                            f"{'never ran' if unseen else 'ran more than once'}")
    if order != sorted(order):
        ran = [cuts[i] for i in order]
        raise BlockCutError(f"blocks.cuts: {cuts} are out of order; the teacher runs them as {', '.join(ran)}")
    for (i, _, prev_out), (j, nxt_in, _) in zip(calls, calls[1:]):
        if nxt_in is not prev_out:
            raise BlockCutError(f"blocks.cuts: {cuts[j]!r} does not consume {cuts[i]!r}'s output directly "
                                f"(something runs between them); cut at consecutive modules")
    return blocks


# --- candidates ----------------------------------------------------------------------------------
def candidate_grid(widths, depths=(1,), kernels=(3,)) -> list[dict]:
    """Every (width, depth, kernel) choice, as block dicts without their interface."""
    return [{"width": int(w), "depth": int(d), "kernel": int(k)} for w, d, k in itertools.product(widths, depths,
                                                                                                 kernels)]


def with_interface(choice: dict, shape: BlockShape) -> dict:
    """A complete ``blockwise_student`` block: the choice plus teacher block ``shape``'s channels and stride."""
    return {"cin": shape.cin, "cout": shape.cout, "down": shape.down, **{k: int(choice[k]) for k in
                                                                         ("width", "depth", "kernel")}}


def num_params(module: nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def block_params(block: dict) -> int:
    return num_params(candidate_block(**block))


def head_params(cout: int, num_classes: int) -> int:
    return cout * num_classes + num_classes


# --- the block loss ------------------------------------------------------------------------------
def relative_mse(pred: torch.Tensor, target: torch.Tensor, target_var: float) -> torch.Tensor:
    """DNA's block loss (the MSE over output neurons) divided by the variance of the teacher's output."""
    return F.mse_loss(pred, target) / max(float(target_var), 1e-12)


@torch.no_grad()
def evaluate_block(block: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, target_var: float,
                   batch_size: int = 256) -> float:
    block.eval()
    total, n = 0.0, 0
    for s in range(0, len(inputs), batch_size):
        x, y = inputs[s:s + batch_size], targets[s:s + batch_size]
        total += float(F.mse_loss(block(x), y, reduction="sum"))
        n += y.numel()
    return total / n / max(float(target_var), 1e-12)


def train_block(block: nn.Module, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                epochs: int = 10, lr: float = 1e-2, batch_size: int = 32, seed: int = 0, on_epoch=None) -> list[float]:
    """Train ``block`` to map the teacher block's inputs to its outputs (``train``: ``(inputs, outputs)``)
    with Adam on the MSE; returns the validation relative MSE after each epoch (``on_epoch(epoch, loss)``
    is called with each)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(block.parameters(), lr=lr)
    var = float(train[1].var())
    history = []
    for epoch in range(epochs):
        block.train()
        order = torch.randperm(len(train[0]), generator=gen)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            loss = relative_mse(block(train[0][idx]), train[1][idx], var)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        history.append(evaluate_block(block, val[0], val[1], var))
        if on_epoch is not None:
            on_epoch(epoch, history[-1])
    return history


# --- the assembly under a budget -----------------------------------------------------------------
@dataclass
class Assembly:
    choice: list[str]  # the candidate name per block
    loss: float  # summed block scores
    params: int  # the whole student's parameters (blocks + head)
    latency_ms: float | None = None  # summed measured block latencies + the head's (None: no latency table)


def _combinations(scores, params, budget, extra_params, latency, latency_budget, extra_latency):
    """Every combination within both limits, as :class:`Assembly` rows (unsorted)."""
    for names in itertools.product(*[sorted(s) for s in scores]):
        total_p = extra_params + sum(params[i][n] for i, n in enumerate(names))
        if budget is not None and total_p > budget:
            continue
        total_t = None if latency is None else extra_latency + sum(latency[i][n] for i, n in enumerate(names))
        if latency_budget is not None and total_t > latency_budget:
            continue
        yield Assembly(list(names), float(sum(scores[i][n] for i, n in enumerate(names))), int(total_p), total_t)


def assemble(scores: list[dict[str, float]], params: list[dict[str, int]], budget: float | None,
             extra_params: int = 0, latency: list[dict[str, float]] | None = None,
             latency_budget: float | None = None, extra_latency: float = 0.0) -> Assembly:
    """The combination (one candidate per block) minimising the summed block scores subject to
    ``sum(params) + extra_params <= budget`` (``extra_params``: the head) and, given a latency table,
    ``sum(latency) + extra_latency <= latency_budget`` (ms; the head's), by exhaustive enumeration of the
    product. ``scores[i]`` maps candidate names of block ``i`` to their score, ``params[i]`` / ``latency[i]``
    to their parameter counts / latencies; ties go to the smaller student. Limits no assembly meets:
    :class:`BudgetError`.

    A summed latency is an estimate of the whole student's (DNA also sums per-block latencies from a lookup
    table); :mod:`kdray.search.blockwise` measures the assembled student too and logs both."""
    check_budget(params, budget, extra_params, latency, latency_budget, extra_latency)
    best: Assembly | None = None
    for a in _combinations(scores, params, budget, extra_params, latency, latency_budget, extra_latency):
        if math.isfinite(a.loss) and (best is None or (a.loss, a.params) < (best.loss, best.params)):
            best = a
    if best is None:
        raise BudgetError("no assembly within the budget has finite block scores")
    return best


def all_assemblies(scores: list[dict[str, float]], params: list[dict[str, int]], budget: float | None,
                   extra_params: int = 0, latency: list[dict[str, float]] | None = None,
                   latency_budget: float | None = None, extra_latency: float = 0.0) -> list[Assembly]:
    """Every combination within the limits, best (lowest summed score) first."""
    out = _combinations(scores, params, budget, extra_params, latency, latency_budget, extra_latency)
    return sorted(out, key=lambda a: (a.loss, a.params))


def smallest_assembly(params: list[dict[str, int]], extra_params: int = 0) -> int:
    return extra_params + sum(min(p.values()) for p in params)


def fastest_assembly(latency: list[dict[str, float]], extra_latency: float = 0.0) -> float:
    return extra_latency + sum(min(t.values()) for t in latency)


def check_budget(params: list[dict[str, int]], budget: float | None, extra_params: int = 0,
                 latency: list[dict[str, float]] | None = None, latency_budget: float | None = None,
                 extra_latency: float = 0.0) -> None:
    """One :class:`BudgetError` line when no assembly meets the limits: each limit below its smallest /
    fastest assembly, or the two limits together (the small assemblies too slow, the fast ones too big)."""
    if budget is not None:
        smallest = smallest_assembly(params, extra_params)
        if budget < smallest:
            raise BudgetError(f"blocks.budget: {int(budget):,} parameters is below the smallest assembly of the "
                              f"candidates ({smallest:,}: the narrowest candidate of every block plus the head); "
                              f"raise the budget or add smaller candidates")
    if latency_budget is None:
        return
    if latency is None:
        raise BudgetError("blocks.budget.latency_ms: no latency table was measured for the candidates")
    fastest = fastest_assembly(latency, extra_latency)
    if latency_budget < fastest:
        raise BudgetError(f"blocks.budget.latency_ms: {latency_budget:g} ms is below the fastest assembly of the "
                          f"candidates ({fastest:.4f} ms: the fastest candidate of every block plus the head, "
                          f"measured); raise it or add faster candidates")
    zeros = [{n: 0.0 for n in p} for p in params]
    feasible = _combinations(zeros, params, budget, extra_params, latency, latency_budget, extra_latency)
    if next(feasible, None) is None:
        raise BudgetError(f"blocks.budget: no assembly has both <= {int(budget):,} parameters and <= "
                          f"{latency_budget:g} ms (the fastest is {fastest:.4f} ms, the smallest "
                          f"{smallest_assembly(params, extra_params):,} parameters); raise either limit")
def build_student(blocks: list[dict], num_classes: int) -> BlockwiseStudent:
    return BlockwiseStudent(blocks, num_classes)


__all__ = ["Assembly", "BlockCutError", "BlockShape", "BudgetError", "TeacherBlocks", "all_assemblies", "assemble",
           "block_name", "block_params", "build_student", "candidate_grid", "check_budget", "cut_teacher",
           "evaluate_block", "fastest_assembly", "head_params", "num_params", "relative_mse", "smallest_assembly", "train_block",
           "with_interface"]
