"""Quantised distillation: fake-quantised students (and teachers), the self-study -> tutoring loop, and a
real low-bit export (packed integer codes + per-group scales). Pure PyTorch.

Papers, and where kdray departs from them:

* **Quantized distillation** (Polino, Pascanu & Alistarh, ICLR 2018): the student's weights are quantised
  in the forward pass, the distillation loss is back-propagated to full-precision "shadow" weights through a
  straight-through estimator, and the weights are scaled per *bucket* before a uniform quantisation to
  ``2^bits`` levels (``v -> (v - min) / (max - min)``). kdray: per bucket = per output channel
  (``granularity: per_channel``) or per tensor; the range is widened to contain 0 and the zero point is
  rounded to an integer code (what ``torch.fake_quantize_per_*_affine`` and integer kernels need; 0 is then
  exact), rounding is deterministic (the paper also has stochastic rounding), and its second method,
  *differentiable quantization* (learnt quantisation points), is not implemented.
* **Apprentice** (Mishra & Marr, ICLR 2018): a full-precision teacher teaches a low-precision student with
  a KD loss (hard labels + the teacher's soft targets) from the start; Apprentice also trains teacher and
  student jointly, kdray's teacher is trained first and frozen. Following the low-precision papers Apprentice
  builds on (WRPN, by the same authors, and others) kdray keeps the first and the last layer in full
  precision by default (``quantize_first_last: False``). The KD loss and its temperature are the
  ``methods:``' own.
* **QKD** (Kim et al. 2019): phases *self-studying* (the quantised student trained alone, CE only), then
  *co-studying* (teacher and student trained together, the teacher adapting to the student), then *tutoring*
  (frozen teacher, KD). kdray implements self-studying -> tutoring (``self_study_epochs`` of CE, then the
  methods); co-studying is **not** implemented (the teacher stays frozen), nor are QKD's trained quantiser
  parameters (kdray's ranges are min / max, below).

Quantisers. Weights: min / max of the latent fp32 weights at every forward (per tensor, or per output
channel = axis 0), codes ``0 .. 2^bits - 1``. Activations: the *inputs* of each quantised layer, per tensor,
their range the min / max of the current batch (dynamic, no running statistics: nothing to synchronise
across DDP ranks, nothing extra in the state dict, so a quantised student's state dict is an fp32 student's);
inputs after a ReLU have min 0, so their zero point is 0 and all ``2^bits`` codes lie on ``[0, max]``.
Gradients: ``torch.fake_quantize_per_*_affine`` pass the gradient through unchanged where the code is inside
``[0, 2^bits - 1]`` and zero it where it was clamped; with ranges taken from the tensor itself nothing is
clamped, so the STE is the identity here.

Modules are quantised *in place*: each ``nn.Conv2d`` / ``nn.Linear`` object becomes a
:class:`QuantConv2d` / :class:`QuantLinear` (its class is swapped, the object, its name, its parameters and
its forward hooks stay), so the knowledge terms' feature taps, the optimizer and DDP, all built before,
keep working.

Export (:func:`export_quantized`): every quantised weight as its integer codes packed ``8 // bits`` per byte
(3 bits: a bit stream), its per-group ``scale`` and ``zero_point``; every other tensor (biases, BatchNorm,
the fp32 first / last layers) as fp32. A dict of tensors and plain values: ``torch.load(weights_only=True)``
reads it. :func:`load_quantized` rebuilds a *dequantised* model: the weights decoded to fp32 once, the
activations still fake-quantised per batch, so it predicts what the fake-quantised student predicts.
CPU engines run int8 at best, so latency here is dequantised (fp32 kernel) execution, not integer execution.
"""
from __future__ import annotations

import io
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.algorithms import precision as prec
from kdray.algorithms.base import Batch
from kdray.algorithms.engine import NonFiniteLossError, TrainLoop

SUPPORTED_BITS = (2, 3, 4, 8)
EXPORT_FORMAT = "kdray-quantized-v1"


def check_bits(bits: int, key: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        allowed = ", ".join(map(str, SUPPORTED_BITS))
        raise ValueError(f"{key} must be one of {allowed} (the widths kdray quantises, packs and tests), got {bits!r}")
    return bits


def qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine parameters for ``2^bits`` codes covering ``[min(lo, 0), max(hi, 0)]``: ``scale`` (float32) and an
    integer ``zero_point`` (int32, the code of 0). A range of width 0 (all zeros) gets scale 1."""
    qmax = 2 ** bits - 1
    lo = torch.clamp(lo.detach().float(), max=0.0)
    hi = torch.clamp(hi.detach().float(), min=0.0)
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = torch.clamp(torch.round(-lo / scale), 0, qmax).to(torch.int32)
    return scale, zero_point


def fake_quantize(x: torch.Tensor, bits: int, axis: int | None = None) -> torch.Tensor:
    """``x`` rounded onto ``2^bits`` levels of its own range (per tensor, or per slice along ``axis``),
    through torch's fake-quant op (straight-through gradient)."""
    qmax = 2 ** bits - 1
    if axis is None:
        scale, zp = qparams(x.min(), x.max(), bits)
        return torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, qmax)
    dims = [d for d in range(x.dim()) if d != axis]
    scale, zp = qparams(x.amin(dim=dims), x.amax(dim=dims), bits)
    return torch.fake_quantize_per_channel_affine(x, scale, zp, axis, 0, qmax)


class _Quantized:
    """What the two quantised layer classes share: ``weight_bits`` (None: the weight is used as stored, e.g.
    already dequantised), ``act_bits`` (None: fp32 inputs) and ``per_channel``."""

    weight_bits: int | None
    act_bits: int | None
    per_channel: bool

    def quantized_weight(self) -> torch.Tensor:
        if self.weight_bits is None:
            return self.weight
        return fake_quantize(self.weight, self.weight_bits, 0 if self.per_channel else None)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits is None:
            return x
        return fake_quantize(x, self.act_bits)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, weight_bits={self.weight_bits}, act_bits={self.act_bits}, "
                f"per_channel={self.per_channel}")


class QuantConv2d(_Quantized, nn.Conv2d):
    """An ``nn.Conv2d`` with fake-quantised inputs and weights."""

    def forward(self, x):
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)


class QuantLinear(_Quantized, nn.Linear):
    """An ``nn.Linear`` with fake-quantised inputs and weights."""

    def forward(self, x):
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)


_QUANT_CLASS = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}


def quantizable_layers(model: nn.Module) -> list[str]:
    """The names of the model's ``nn.Conv2d`` / ``nn.Linear`` modules (plain or already quantised), in
    registration order (the first is taken as the input layer, the last as the output layer)."""
    return [name for name, m in model.named_modules()
            if type(m) in _QUANT_CLASS or isinstance(m, _Quantized)]


def quantize_model_(model: nn.Module, bits: int, act_bits: int | None = None, per_channel: bool = True,
                    quantize_first_last: bool = False, layers: dict[str, dict] | None = None) -> dict[str, dict]:
    """Make the model's conv / linear layers fake-quantised, in place (see the module docstring); return
    ``{layer name: {"weight_bits", "act_bits", "per_channel"}}`` of the quantised ones. ``layers`` gives
    that mapping explicitly instead (a rebuilt export). The first and last layer stay fp32 unless
    ``quantize_first_last``. ``act_bits``: default ``bits``."""
    names = quantizable_layers(model)
    if layers is None:
        check_bits(bits)
        act_bits = bits if act_bits is None else check_bits(act_bits, "act_bits")
        chosen = names if quantize_first_last else names[1:-1]
        layers = {n: {"weight_bits": bits, "act_bits": act_bits, "per_channel": per_channel} for n in chosen}
    modules = dict(model.named_modules())
    for name, spec in layers.items():
        module = modules[name]
        if not isinstance(module, _Quantized):
            module.__class__ = _QUANT_CLASS[type(module)]
        module.weight_bits = spec["weight_bits"]
        module.act_bits = spec["act_bits"]
        module.per_channel = bool(spec["per_channel"])
    return {n: dict(s) for n, s in layers.items()}


def quantized_layers(model: nn.Module) -> dict[str, dict]:
    """``{name: {"weight_bits", "act_bits", "per_channel"}}`` of the model's quantised layers."""
    return {n: {"weight_bits": m.weight_bits, "act_bits": m.act_bits, "per_channel": m.per_channel}
            for n, m in model.named_modules() if isinstance(m, _Quantized)}


# --- integer codes and their packing ------------------------------------------------------------------
def weight_codes(weight: torch.Tensor, bits: int, per_channel: bool):
    """``(codes, scale, zero_point)`` of a weight: codes (uint8, the weight's shape) in ``0 .. 2^bits - 1``,
    one ``scale`` / ``zero_point`` per output channel (or one). The codes are read back from torch's fake-quant
    output, so they are exactly the levels the student trained with."""
    w = weight.detach().float().cpu()
    axis = 0 if per_channel else None
    if axis is None:
        scale, zp = qparams(w.min(), w.max(), bits)
        scale, zp = scale.reshape(1), zp.reshape(1)
    else:
        dims = list(range(1, w.dim()))
        scale, zp = qparams(w.amin(dim=dims), w.amax(dim=dims), bits)
    fq = fake_quantize(w, bits, axis)
    view = (-1,) + (1,) * (w.dim() - 1) if per_channel else (1,) * w.dim()
    codes = torch.round(fq / scale.reshape(view)) + zp.reshape(view)
    return codes.clamp(0, 2 ** bits - 1).to(torch.uint8), scale, zp


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """fp32 weights from codes: ``(code - zero_point) * scale`` per group (axis 0, or one group)."""
    view = (-1,) + (1,) * (codes.dim() - 1) if scale.numel() > 1 else (1,) * codes.dim()
    return (codes.float() - zero_point.reshape(view).float()) * scale.reshape(view)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (< 2^bits) as a bit stream, ``bits`` per code, least significant bit first, in uint8 bytes:
    ``8 // bits`` codes per byte for 2, 4, 8 bits; 3 bits straddle byte boundaries."""
    flat = codes.reshape(-1).to(torch.int64)
    if bits == 8:
        return flat.to(torch.uint8)
    stream = ((flat[:, None] >> torch.arange(bits)) & 1).reshape(-1)
    stream = torch.cat([stream, stream.new_zeros((-stream.numel()) % 8)])
    return (stream.reshape(-1, 8) << torch.arange(8)).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` codes of :func:`pack_codes`' stream, as uint8."""
    if bits == 8:
        return packed[:count].clone()
    stream = ((packed.to(torch.int64)[:, None] >> torch.arange(8)) & 1).reshape(-1)[:count * bits]
    return (stream.reshape(count, bits) << torch.arange(bits)).sum(dim=1).to(torch.uint8)


def export_quantized(model: nn.Module, meta: dict | None = None) -> dict:
    """The model as a low-bit export (see the module docstring): ``quantized`` = per quantised weight its
    packed codes, scale, zero point, shape and bits; ``tensors`` = every other state entry in fp32 (integer
    buffers as they are); ``layers`` = the quantised layers' settings; ``meta`` = plain values (model name,
    args) for the loader."""
    layers = quantized_layers(model)
    quantized, tensors = {}, {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if leaf == "weight" and owner in layers and layers[owner]["weight_bits"] is not None:
            spec = layers[owner]
            codes, scale, zp = weight_codes(value, spec["weight_bits"], spec["per_channel"])
            quantized[key] = {"codes": pack_codes(codes, spec["weight_bits"]), "scale": scale, "zero_point": zp,
                              "shape": torch.tensor(list(value.shape), dtype=torch.int64),
                              "bits": spec["weight_bits"]}
        else:
            value = value.detach().cpu()
            tensors[key] = value.float() if value.is_floating_point() else value
    return {"format": EXPORT_FORMAT, "quantized": quantized, "tensors": tensors, "layers": layers,
            "meta": dict(meta or {})}


def decoded_codes(entry: dict) -> torch.Tensor:
    """An exported weight's integer codes, unpacked to its shape."""
    shape = [int(s) for s in entry["shape"]]
    count = 1
    for s in shape:
        count *= s
    return unpack_codes(entry["codes"], int(entry["bits"]), count).reshape(shape)


def dequantized_state(export: dict) -> dict[str, torch.Tensor]:
    """The fp32 state dict an export decodes to."""
    if export.get("format") != EXPORT_FORMAT:
        raise ValueError(f"not a kdray quantised export (format {export.get('format')!r}, expected {EXPORT_FORMAT!r})")
    state = dict(export["tensors"])
    for key, entry in export["quantized"].items():
        state[key] = dequantize(decoded_codes(entry), entry["scale"], entry["zero_point"])
    return state


def load_quantized(model: nn.Module, export: dict) -> nn.Module:
    """Make ``model`` (the export's architecture, freshly built) the exported one: weights decoded once to
    fp32, the exported layers' inputs fake-quantised at their ``act_bits`` (weights not quantised again)."""
    model.load_state_dict(dequantized_state(export))
    layers = {n: {**s, "weight_bits": None} for n, s in export["layers"].items()}
    quantize_model_(model, 0, layers=layers)
    return model


def saved_bytes(obj) -> int:
    """The size of ``torch.save(obj)``: what the file takes on disk."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer().nbytes


def payload_bytes(obj) -> int:
    """The bytes of the tensors in ``obj`` (nested dicts), without ``torch.save``'s per-tensor container
    overhead (a few hundred bytes per tensor, which dominates a tiny model's file)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(payload_bytes(v) for v in obj.values())
    return 0


@torch.no_grad()
def latency_ms(model: nn.Module, inputs: torch.Tensor, runs: int = 15, warmup: int = 3) -> float:
    """Median wall time of ``model(inputs)`` in milliseconds (eval mode, no grad), after ``warmup`` calls."""
    was_training = model.training
    model.eval()
    for _ in range(warmup):
        model(inputs)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model(inputs)
        times.append((time.perf_counter() - start) * 1000)
    model.train(was_training)
    return statistics.median(times)


# --- the loop ------------------------------------------------------------------------------------------
class QuantizedLoop(TrainLoop):
    """:class:`~kdray.algorithms.engine.TrainLoop` with QKD's first phase: for the first
    ``self_study_epochs`` epochs the quantised student learns from the hard labels alone (the knowledge terms
    still run, weighted 0, so every parameter DDP tracks has a gradient), then the terms teach it (tutoring).
    ``on_trained(loop)``, when given, runs once after the last epoch (the export)."""

    def __init__(self, *, self_study_epochs: int = 0, on_trained=None, **kwargs):
        super().__init__(**kwargs)
        self.self_study_epochs = self_study_epochs
        self.on_trained = on_trained

    def step(self, batch: Batch, epoch: int = 0, step: int = 0):
        if epoch >= self.self_study_epochs or self.teacher is None:
            return super().step(batch, epoch, step)
        with prec.autocast(self.device, self.precision):
            teacher_out = self.teacher(batch if getattr(self.teacher, "wants_batch", False) else batch.inputs)
            logits, terms = self.distiller(batch, teacher_out)
        losses = {"ce": F.cross_entropy(prec.full_precision(logits), batch.targets)}
        loss = losses["ce"] + sum(0.0 * v for k, v in terms.items() if k != "ce")
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"non-finite loss at epoch {epoch} step {step} (self-studying CE = "
                                     f"{float(losses['ce'].detach())}); lower the lr")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss, losses

    def run(self):
        history = super().run()
        if self.on_trained is not None:
            self.on_trained(self)
        return history
