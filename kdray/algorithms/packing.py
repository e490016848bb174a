"""One model output as one ``(batch, width)`` tensor, so ranks exchange logits and features in one collective.

Peers all-gather their packed outputs; a teacher-sharded ensemble all-reduces its teachers' packed outputs
side by side. Both need the same thing: where each tensor of a :class:`ModelOutput` sits in a flat row,
and how to rebuild the output from that row (shapes and dtypes are known on every rank beforehand).
"""
from __future__ import annotations

import torch

from kdray.algorithms.base import ModelOutput


class OutputLayout:
    """The logits then the named features of an output, each flattened per sample, side by side."""

    def __init__(self, entries: list[tuple[str, tuple[int, ...], torch.dtype]]):
        if not entries or entries[0][0] != "logits":
            raise ValueError("an output layout starts with the logits")
        self.entries = [(name, tuple(shape), dtype) for name, shape, dtype in entries]
        self.sizes = [torch.Size(shape).numel() for _, shape, _ in self.entries]
        self.width = sum(self.sizes)

    @classmethod
    def of(cls, out: ModelOutput, points: list[str] | None = None) -> "OutputLayout":
        """The layout of ``out``'s logits and its features at ``points`` (default: all of them)."""
        names = list(out.features) if points is None else points
        tensors = [("logits", out.logits)] + [(p, out.features[p]) for p in names]
        for name, value in tensors:
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"feature point {name!r} gives a {type(value).__name__}, not a tensor; "
                                f"choose a module whose output is a tensor")
        return cls([(name, tuple(v.shape[1:]), v.dtype) for name, v in tensors])

    def describe(self) -> list[tuple[str, tuple[int, ...], str]]:
        """Picklable form, for ``all_gather_object``; :meth:`from_description` reverses it."""
        return [(name, shape, str(dtype).removeprefix("torch.")) for name, shape, dtype in self.entries]

    @classmethod
    def from_description(cls, rows) -> "OutputLayout":
        return cls([(name, tuple(shape), getattr(torch, dtype)) for name, shape, dtype in rows])

    def pack(self, out: ModelOutput, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``(batch, width)``: the output's tensors, detached, flattened per sample, in layout order."""
        parts = [out.logits] + [out.features[name] for name, _, _ in self.entries[1:]]
        dtype = dtype or out.logits.dtype
        return torch.cat([p.detach().flatten(1).to(dtype) for p in parts], 1)

    def unpack(self, flat: torch.Tensor) -> ModelOutput:
        """The output whose packed rows are ``flat[:, :width]`` (each tensor back in its own dtype)."""
        tensors, at = {}, 0
        for (name, shape, dtype), size in zip(self.entries, self.sizes):
            tensors[name] = flat[:, at: at + size].reshape(flat.shape[0], *shape).to(dtype)
            at += size
        logits = tensors.pop("logits")
        return ModelOutput(logits, tensors)
