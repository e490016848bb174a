"""A small decoder-only (GPT-style) causal language model in plain PyTorch, for tests, benches and tiny
teacher/student pairs.

Pure PyTorch on purpose: importing transformers costs tens of seconds on a loaded CPU machine, too much for
unit tests; a real teacher comes from transformers (``AutoModelForCausalLM``) and the LM losses accept both
(:func:`kdray.algorithms.lm.generation.causal_logits` reads ``.logits`` from a transformers output).
Pre-LayerNorm blocks, learned positions, causal ``scaled_dot_product_attention``, no dropout, an untied LM
head (``lm_head``) so the chunked losses can take the last hidden states (:meth:`TinyCausalLM.hidden_states`)
and the head separately.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.models.registry import register_model


class _Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, length, 3, self.heads, width // self.heads).unbind(2)
        attended = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, length, width))
        return x + self.mlp(self.norm2(x))


class TinyCausalLM(nn.Module):
    """``forward(input_ids) -> logits (B, L, vocab_size)``; ``hidden_states(input_ids) -> (B, L, width)``."""

    outputs_classes = False  # per-token logits, not (B, classes): scheme lm checks the vocabulary instead

    def __init__(self, vocab_size: int, layers: int = 2, width: int = 64, heads: int = 4, max_length: int = 128):
        super().__init__()
        if width % heads:
            raise ValueError(f"TinyCausalLM width {width} must be a multiple of heads {heads}")
        self.vocab_size, self.max_length = vocab_size, max_length
        self.embed, self.position = nn.Embedding(vocab_size, width), nn.Embedding(max_length, width)
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab_size, bias=False)

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] > self.max_length:
            raise ValueError(f"TinyCausalLM: sequence length {input_ids.shape[1]} > max_length {self.max_length}")
        x = self.embed(input_ids) + self.position(torch.arange(input_ids.shape[1], device=input_ids.device))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids))


def tiny_causal_lm(vocab_size: int, layers: int = 2, width: int = 64, heads: int = 4, max_length: int = 128,
                   seed: int = 0) -> TinyCausalLM:
    """A :class:`TinyCausalLM` with weights drawn from ``seed`` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyCausalLM(vocab_size, layers, width, heads, max_length)


@register_model("causal_lm", family="lm")
def causal_lm(num_classes: int, layers: int = 2, width: int = 64, heads: int = 4, max_length: int = 128,
              seed: int | None = None) -> TinyCausalLM:
    """The registry's builder (scheme ``lm``): ``num_classes`` is the corpus's vocabulary size. ``seed`` None
    draws the weights from the global RNG, which the stage runner seeds per stage."""
    if seed is None:
        return TinyCausalLM(num_classes, layers, width, heads, max_length)
    return tiny_causal_lm(num_classes, layers, width, heads, max_length, seed)
