"""Collating ``(inputs, target, index)`` samples whose inputs may be a mapping of variable-length tensors.

Text samples are tokenised once to their own length; a batch is padded only to its longest sample (dynamic
padding, as Hugging Face's ``DataCollatorWithPadding``) instead of every sample to the corpus maximum. Inputs
pad with 0 (BERT's ``[PAD]`` id; the ``attention_mask`` is 0 there, so what id fills a padded position never
reaches a real token: padding sits after the tokens, and masked keys get no attention); per-token targets
(masked-LM labels) pad with -100, the ``ignore_index`` of ``F.cross_entropy``. Samples whose inputs are one
image tensor go through ``default_collate`` unchanged, so image jobs batch exactly as before.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.utils.data import default_collate

#: What padded positions of a per-token target hold: ``F.cross_entropy``'s default ``ignore_index``.
IGNORE_INDEX = -100


def pad_stack(tensors: list[torch.Tensor], value: int | float) -> torch.Tensor:
    """``(B, L_max, ...)``: each ``(L_i, ...)`` tensor padded at the end of dim 0 with ``value``."""
    length = max(t.shape[0] for t in tensors)
    out = torch.full((len(tensors), length, *tensors[0].shape[1:]), value, dtype=tensors[0].dtype)
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t
    return out


def collate_batch(samples: list[tuple]):
    """``DataLoader``'s ``collate_fn``: mappings of 1-D tensors padded per key (0), tensor targets padded
    with -100; anything else (image tensors, int targets) by ``default_collate``."""
    first_x, first_y = samples[0][0], samples[0][1]
    if not isinstance(first_x, Mapping):
        return default_collate(samples)
    inputs = {}
    for key in first_x:
        values = [s[0][key] for s in samples]
        same = all(v.shape == values[0].shape for v in values)
        inputs[key] = torch.stack(values) if same else pad_stack(values, 0)
    if isinstance(first_y, torch.Tensor) and first_y.dim() >= 1:
        targets = pad_stack([s[1] for s in samples], IGNORE_INDEX)
    else:
        targets = torch.as_tensor([int(s[1]) for s in samples], dtype=torch.long)
    indices = torch.as_tensor([int(s[2]) for s in samples], dtype=torch.long)
    return inputs, targets, indices
