"""Numeric precision and memory layout of a training step: autocast, loss scaling, full-precision losses.

``precision`` is one of :data:`PRECISIONS`:

* ``fp32``: no autocast (the default; nothing changes);
* ``bf16``: the student step and the teacher forward run under ``torch.autocast(dtype=bfloat16)``; no loss
  scaling (bf16 has fp32's exponent range);
* ``fp16``: the same with ``float16``, plus a :class:`torch.amp.GradScaler` for the device type, because
  fp16 gradients underflow without it.

Weights, optimizer state and the knowledge terms' arithmetic stay in full precision whatever the autocast
dtype: every term runs with autocast switched off on inputs upcast by :func:`full_precision` (see
``KnowledgeTerm.__call__``). Softmax, log-softmax, KL, log-sum-exp, the contrastive ``exp(<a, m> / 0.07)``
and the distance / Gram matrices of relation terms lose whole digits in bf16 (8 bits of mantissa), and
``torch.autocast`` on CPU leaves ``log_softmax`` / ``logsumexp`` in bf16 (torch 2.14), so the terms cannot
rely on autocast's own fp32 lists. The terms' connectors are tiny next to the networks, so running them in
fp32 costs little; the networks, where the time goes, run in the low precision.

``float64`` is left as it is (:func:`full_precision` upcasts only ``float16`` / ``bfloat16``), so a
double-precision model stays double-precision end to end.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    return precision


def device_type(device) -> str:
    """``"cpu"`` / ``"cuda"`` / ... of a device, a device string or a tensor."""
    if isinstance(device, torch.Tensor):
        return device.device.type
    return torch.device(device).type


def autocast(device, precision: str = "fp32"):
    """The autocast context of a step at ``precision`` on ``device`` (a no-op context for ``fp32``)."""
    check_precision(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type(device), dtype=_AUTOCAST_DTYPES[precision])


def grad_scaler(device, precision: str = "fp32") -> torch.amp.GradScaler:
    """A :class:`torch.amp.GradScaler` for the device type, enabled for ``fp16`` only; disabled it is a
    no-op with the same interface (``scale(loss)`` returns ``loss``, ``step(opt)`` calls ``opt.step()``)."""
    check_precision(precision)
    return torch.amp.GradScaler(device_type(device), enabled=precision == "fp16")


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """``x`` in ``float32`` when it is ``float16`` / ``bfloat16``; any other tensor (fp32, fp64, ints) as it is."""
    return x.float() if isinstance(x, torch.Tensor) and x.dtype in _LOW_PRECISION else x


def autocast_off(device):
    """Switch autocast off for ``device``'s type (a device, string or tensor) inside the block."""
    return torch.autocast(device_type=device_type(device), enabled=False)


def to_channels_last(module: nn.Module) -> nn.Module:
    """``module`` with its 4-D parameters and buffers in ``torch.channels_last`` (in place; a no-op when they
    already are). Do it before wrapping in DDP: DDP lays out its gradient buckets by the parameters' strides."""
    return module.to(memory_format=torch.channels_last)


def channels_last_input(x):
    """A 4-D tensor as ``channels_last``; anything else (token ids, a mapping of inputs) unchanged."""
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def compile_in_place(module: nn.Module, **options) -> nn.Module:
    """``module.compile(**options)``: ``torch.compile`` its forward in place, so its ``state_dict`` keys,
    forward hooks (feature taps) and identity are unchanged (``torch.compile(module)`` would wrap it and
    prefix every key with ``_orig_mod.``).

    Sets ``torch._dynamo.config.skip_nnmodule_hook_guards = False`` for the process: by default dynamo does not
    guard on forward hooks and shares a graph between modules of the same structure, so a student whose
    architecture was compiled earlier without feature taps (its teacher stage, in one process) would run the
    hook-less graph and capture no features."""
    import torch._dynamo

    torch._dynamo.config.skip_nnmodule_hook_guards = False
    module.compile(**options)
    return module
