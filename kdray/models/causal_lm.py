"""A small decoder-only (GPT-style) causal language model in plain PyTorch, for tests, benches and tiny
teacher/student pairs.

Pure PyTorch on purpose: importing transformers costs tens of seconds on a loaded CPU machine, too much for
unit tests; a real teacher comes from transformers (``AutoModelForCausalLM``) and the LM losses accept both
(:func:`kdray.algorithms.lm.generation.causal_logits` reads ``.logits`` from a transformers output).
Pre-LayerNorm blocks, learned positions, causal ``scaled_dot_product_attention``, no dropout, an untied LM
head (``lm_head``) so the chunked losses can take the last hidden states (:meth:`TinyCausalLM.hidden_states`)
and the head separately.

An optional KV cache (:class:`KVCache`, from :meth:`TinyCausalLM.new_kv_cache`) makes generation linear in
the length instead of quadratic: ``model(new_ids, cache=cache)`` runs only the new positions, attends to the
keys and values the cache holds for the earlier ones, and appends its own. It goes through ``forward`` (not
a separate method) so wrappers that hook ``forward`` (FSDP2's unsharding) still see every call. Without a
cache the forward is the same computation as before the cache existed.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.models.registry import register_model


class KVCache:
    """The keys and values of the positions a :class:`TinyCausalLM` has seen, one ``(B, heads, length,
    head_dim)`` pair per block, appended in place by ``model(ids, cache=cache)``."""

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    @property
    def length(self) -> int:
        """Positions cached so far (the position of the next token fed)."""
        return self.keys[0].shape[2] if self.keys else 0

    def extend(self, block: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append block ``block``'s new keys and values; returns all of that block's keys and values."""
        if block == len(self.keys):
            self.keys.append(keys)
            self.values.append(values)
        else:
            self.keys[block] = torch.cat([self.keys[block], keys], dim=2)
            self.values[block] = torch.cat([self.values[block], values], dim=2)
        return self.keys[block], self.values[block]


class _Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, index: int = 0, past: int = 0) -> torch.Tensor:
        """``past``: positions already in ``cache`` before this call; block ``index``'s entries are extended."""
        b, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, length, 3, self.heads, width // self.heads).unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.extend(index, k, v)
        if past == 0:
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # new position i (absolute past + i) sees keys 0..past + i: a causal mask shifted by past
            mask = None if length == 1 else torch.ones(length, past + length, dtype=torch.bool,
                                                       device=x.device).tril(past)
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, length, width))
        return x + self.mlp(self.norm2(x))


class TinyCausalLM(nn.Module):
    """``forward(input_ids, cache=None) -> logits (B, L, vocab_size)``; ``hidden_states(input_ids, cache=None)
    -> (B, L, width)``. With a :class:`KVCache`, ``input_ids`` are the tokens after the cached ones."""

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

    def new_kv_cache(self) -> KVCache:
        """An empty cache for incremental decoding (:mod:`kdray.algorithms.lm.generation` uses it)."""
        return KVCache()

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        past = cache.length if cache is not None else 0
        if past + input_ids.shape[1] > self.max_length:
            raise ValueError(f"TinyCausalLM: sequence length {past + input_ids.shape[1]} > max_length "
                             f"{self.max_length}")
        positions = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)
        x = self.embed(input_ids) + self.position(positions)
        for index, block in enumerate(self.blocks):
            x = block(x, cache, index, past)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids, cache))


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
