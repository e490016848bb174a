"""Sampling completions from a causal LM for on-policy distillation: the prompt stays, the completion positions
are rewritten left to right by the model's own samples.

A batch is packed to a fixed length: per row a prompt, a completion and possibly padding, with
``completion_mask`` marking the completion positions (the same mask that selects the loss's targets). Position
``t`` of the completion is sampled from the model's next-token distribution after ``input_ids[:, :t]`` at the
given temperature (``temperature = 0``: greedy), so the new batch has the same shape and mask and any
teacher can score it.

KV cache (``use_cache=True``, the default): when ``t`` is sampled every position before it is final (earlier
completion positions were sampled before, the others never change), so the model need only be fed the tokens
since the last step, ``input_ids[:, done:t]``, attending to the cached keys and values of the rest. Exact for
any per-row layout of prompts, completions and gaps; a step costs O(t) instead of O(t^2) attention and one
position of MLP instead of t. Models that cache: those with ``new_kv_cache()`` (kdray's
:class:`~kdray.models.causal_lm.TinyCausalLM` and :class:`~kdray.models.hf_causal.HFCausalLM`, called as
``model(ids, cache=cache)``) and bare transformers causal LMs (their own ``cache`` / ``past_key_values``
argument). Others (a DDP wrapper, a plain module) recompute the prefix each step, as ``use_cache=False`` does.
transformers' ``generate`` is not used: it samples from its own RNG (not the caller's ``torch.Generator``)
and continues every row from one length, where a packed batch's completions start at different positions.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.nn as nn


def causal_logits(model: nn.Module, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """The ``(B, L, V)`` logits of a causal LM: a plain module's output or a transformers output's ``.logits``."""
    out = model(input_ids, **kwargs)
    return getattr(out, "logits", out)


def _is_transformers_lm(model: nn.Module) -> bool:
    can_generate = getattr(model, "can_generate", None)
    return callable(can_generate) and hasattr(model, "config") and bool(can_generate())


def incremental_decoder(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``feed(new_ids) -> logits of new_ids`` with a fresh KV cache holding every token fed before, or ``None``
    when ``model`` has no cache (see the module doc)."""
    if callable(getattr(model, "new_kv_cache", None)):
        cache = model.new_kv_cache()
        return lambda new_ids: causal_logits(model, new_ids, cache=cache)
    if _is_transformers_lm(model):
        # transformers 5.x names the argument and the output field ``cache``; older releases ``past_key_values``.
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        state: dict = {name: None}

        def feed(new_ids: torch.Tensor) -> torch.Tensor:
            out = model(input_ids=new_ids, use_cache=True, **state)
            state[name] = getattr(out, name)
            return out.logits

        return feed
    return None


@torch.no_grad()
def sample_completions(model: nn.Module, input_ids: torch.Tensor, completion_mask: torch.Tensor,
                       temperature: float = 1.0, generator: torch.Generator | None = None,
                       use_cache: bool = True) -> torch.Tensor:
    """A copy of ``input_ids`` whose completion positions hold the model's samples (its mode is restored).

    ``use_cache`` feeds only the new tokens each step when the model has a KV cache; the tokens equal the
    uncached ones (same logits up to float summation order, the same draws from ``generator``)."""
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
        feed = incremental_decoder(model) if use_cache else None
        done = 0  # positions already in the cache
        for t in positions:
            if feed is None:
                logits = causal_logits(model, ids[:, :t])[:, -1].float()
            else:
                logits = feed(ids[:, done:t])[:, -1].float()
                done = t
            if temperature == 0:
                sampled = logits.argmax(-1)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                sampled = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            ids[:, t] = torch.where(keep[:, t], sampled, ids[:, t])
    finally:
        model.train(was_training)
    return ids
