"""Sampling completions from a causal LM for on-policy distillation: the prompt stays, the completion positions
are rewritten left to right by the model's own samples.

A batch is packed to a fixed length: per row a prompt, a completion and possibly padding, with
``completion_mask`` marking the completion positions (the same mask that selects the loss's targets). Position
``t`` of the completion is sampled from the model's next-token distribution after ``input_ids[:, :t]`` at the
given temperature (``temperature = 0``: greedy), so the new batch has the same shape and mask and any
teacher can score it. Every step recomputes the prefix (no KV cache): simple and exact for the tiny models of
tests and benches; a production student generates with its own ``generate`` (or vLLM, as TRL and verl do) and
passes the sequences in.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def causal_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The ``(B, L, V)`` logits of a causal LM: a plain module's output or a transformers output's ``.logits``."""
    out = model(input_ids)
    return getattr(out, "logits", out)


@torch.no_grad()
def sample_completions(model: nn.Module, input_ids: torch.Tensor, completion_mask: torch.Tensor,
                       temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """A copy of ``input_ids`` whose completion positions hold the model's samples (its mode is restored)."""
    if temperature < 0:
        raise ValueError(f"sampling temperature must be >= 0 (0: greedy), got {temperature}")
    keep = completion_mask.bool()
    if keep[:, 0].any():
        raise ValueError("sample_completions: a completion cannot start at position 0; every row needs a prompt "
                         "token before its completion")
    ids = input_ids.clone()
    positions = keep.any(0).nonzero().flatten().tolist()
    was_training = model.training
    model.eval()
    try:
        for t in positions:
            logits = causal_logits(model, ids[:, :t])[:, -1].float()
            if temperature == 0:
                sampled = logits.argmax(-1)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                sampled = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            ids[:, t] = torch.where(keep[:, t], sampled, ids[:, t])
    finally:
        model.train(was_training)
    return ids
