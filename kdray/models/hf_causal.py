"""Causal language models from Hugging Face ``transformers`` (the optional ``kdray[text]`` extra), as LM
teachers and students.

:class:`HFCausalLM` wraps an ``AutoModelForCausalLM`` so it has the interface kdray's LM code is written
against (the same as :class:`~kdray.models.causal_lm.TinyCausalLM`):

- ``forward(input_ids, attention_mask=None, cache=None) -> logits (B, L, V)``, a tensor (what
  :func:`kdray.algorithms.lm.generation.causal_logits` and the token losses take);
- ``hidden_states(input_ids, attention_mask=None) -> (B, L, H)``, the last hidden states after the final
  norm, and ``lm_head`` (the output embedding, hidden -> vocabulary; GPT-2 ties it to the input embedding), so
  ``lm_head(hidden_states(x)) == forward(x)`` and the chunked losses of :mod:`kdray.algorithms.lm.chunked`
  never build the full ``(B, L, V)`` logits;
- ``new_kv_cache()``: a transformers ``DynamicCache``, filled in place by ``model(new_ids, cache=cache)``, which
  generation uses to feed one new token per step;
- ``vocab_size``, ``max_length``, ``num_layers``, ``hidden_size``, ``tokenizer_dir`` (or None) and
  ``tokenizer()``, read by :func:`kdray.algorithms.lm.vocabulary.check_shared_vocabulary`.

Two ways to make one (:func:`hf_causal_lm`, registered as ``hf_causal_lm`` in the ``lm`` family): a local
directory written by ``save_pretrained`` (``from_pretrained(path, local_files_only=True)``, never the hub, in
``dtype``), or a config with size knobs (``arch``: ``gpt2``, ``llama`` or ``qwen2``; ``layers``, ``hidden``,
``heads``, ``kv_heads``, ``intermediate``, ``vocab_size``, ``max_length``) built with random weights drawn
from ``seed``. GPT-2's dropout is set to 0 (``dropout``), as in TinyCausalLM, so a step is deterministic.
transformers is imported only when a model is built: image jobs never pay for it.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch
import torch.nn as nn

from kdray.models.registry import register_model
from kdray.models.text import require_transformers

ARCHS = ("gpt2", "llama", "qwen2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Files that mark a saved tokenizer in a model directory.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class CausalLMError(ValueError):
    """A causal LM that cannot be built as asked (one line: what, and what is allowed)."""


class HFCausalLM(nn.Module):
    """A transformers causal LM (``self.hf``) with kdray's LM interface (see the module doc)."""

    outputs_classes = False  # per-token logits, not (B, classes): scheme lm checks the vocabulary instead

    def __init__(self, hf_model: nn.Module, tokenizer_dir: str | None = None):
        super().__init__()
        self.hf, self.tokenizer_dir = hf_model, tokenizer_dir
        config = hf_model.config
        self.vocab_size = int(config.vocab_size)
        self.max_length = int(getattr(config, "max_position_embeddings", None) or config.n_positions)
        self.num_layers = int(config.num_hidden_layers)
        self.hidden_size = int(config.hidden_size)
        # transformers 5.x renamed ``past_key_values`` to ``cache`` (the old name warns, then goes in 5.40)
        forward_args = inspect.signature(hf_model.forward).parameters
        self.cache_argument = "cache" if "cache" in forward_args else "past_key_values"

    @property
    def lm_head(self) -> nn.Module:
        """The output embedding (hidden -> vocabulary logits)."""
        return self.hf.get_output_embeddings()

    def new_kv_cache(self):
        """An empty ``DynamicCache`` for incremental decoding."""
        return require_transformers().DynamicCache(config=self.hf.config)

    def _check_length(self, input_ids: torch.Tensor, cache) -> None:
        total = input_ids.shape[1] + (cache.get_seq_length() if cache is not None else 0)
        if total > self.max_length:
            raise ValueError(f"{type(self.hf).__name__}: sequence length {total} > max_length {self.max_length}")

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check_length(input_ids, None)
        return self.hf.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache=None) -> torch.Tensor:
        self._check_length(input_ids, cache)
        if cache is None:
            return self.hf(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return self.hf(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                       **{self.cache_argument: cache}).logits

    def tokenizer(self):
        """The tokenizer saved beside the weights (local files only), or ``None``."""
        if self.tokenizer_dir is None:
            return None
        return require_transformers().AutoTokenizer.from_pretrained(self.tokenizer_dir, local_files_only=True)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write weights, config and (when known) tokenizer, so :func:`hf_causal_lm` with ``path=directory``
        (or ``AutoModelForCausalLM.from_pretrained``) loads it back."""
        directory = Path(directory)
        self.hf.save_pretrained(directory)
        tokenizer = self.tokenizer()
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        return directory


def _dtype(dtype: str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise CausalLMError(f"causal LM dtype {dtype!r}: allowed {', '.join(DTYPES)} (or null: as saved / float32)")
    return DTYPES[dtype]


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def load_causal_lm(path: str | Path, dtype: str | None = None) -> HFCausalLM:
    """The causal LM saved in the local directory ``path`` (with its tokenizer when one is saved there)."""
    directory = Path(path).expanduser()
    if not (directory / "config.json").is_file():
        raise CausalLMError(f"causal LM path {str(path)!r} is not a local model directory (no config.json in it); "
                            f"give a directory written by save_pretrained (kdray never downloads from the hub)")
    transformers = require_transformers()
    kwargs = {"dtype": _dtype(dtype)} if dtype is not None else {}
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True, **kwargs)
    return HFCausalLM(hf, str(directory) if _has_tokenizer(directory) else None)


def causal_lm_config(arch: str, *, layers: int, hidden: int, heads: int, kv_heads: int | None,
                     intermediate: int | None, vocab_size: int, max_length: int, dropout: float):
    """A transformers config of architecture ``arch`` with kdray's size knobs."""
    if arch not in ARCHS:
        raise CausalLMError(f"causal LM arch {arch!r}: allowed {', '.join(ARCHS)}")
    if hidden % heads:
        raise CausalLMError(f"causal LM hidden ({hidden}) must be a multiple of heads ({heads})")
    kv_heads = heads if kv_heads is None else kv_heads
    if heads % kv_heads:
        raise CausalLMError(f"causal LM heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    intermediate = 4 * hidden if intermediate is None else intermediate
    transformers = require_transformers()
    if arch == "gpt2":
        last = vocab_size - 1  # GPT-2's default bos/eos id 50256 lies outside a small vocabulary
        return transformers.GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, n_inner=intermediate,
                                       vocab_size=vocab_size, n_positions=max_length, bos_token_id=last,
                                       eos_token_id=last, resid_pdrop=dropout, embd_pdrop=dropout,
                                       attn_pdrop=dropout)
    config_class = transformers.LlamaConfig if arch == "llama" else transformers.Qwen2Config
    return config_class(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                        num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=vocab_size,
                        max_position_embeddings=max_length, attention_dropout=dropout, bos_token_id=None,
                        eos_token_id=None, pad_token_id=None)


def random_causal_lm(arch: str = "llama", *, layers: int = 2, hidden: int = 64, heads: int = 4,
                     kv_heads: int | None = None, intermediate: int | None = None, vocab_size: int,
                     max_length: int = 128, dropout: float = 0.0, seed: int = 0, dtype: str | None = None,
                     tokenizer: str | None = None) -> HFCausalLM:
    """A new causal LM with random weights drawn from ``seed`` (the global RNG is left as it was)."""
    config = causal_lm_config(arch, layers=int(layers), hidden=int(hidden), heads=int(heads),
                              kv_heads=None if kv_heads is None else int(kv_heads),
                              intermediate=None if intermediate is None else int(intermediate),
                              vocab_size=int(vocab_size), max_length=int(max_length), dropout=float(dropout))
    transformers = require_transformers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = transformers.AutoModelForCausalLM.from_config(config)
    torch_dtype = _dtype(dtype)
    if torch_dtype is not None:
        hf = hf.to(torch_dtype)
    return HFCausalLM(hf, tokenizer)


@register_model("hf_causal_lm", family="lm")
def hf_causal_lm(num_classes: int | None = None, path: str | None = None, dtype: str | None = None,
                 arch: str | None = None, layers: int | None = None, hidden: int | None = None,
                 heads: int | None = None, kv_heads: int | None = None, intermediate: int | None = None,
                 vocab_size: int | None = None, max_length: int | None = None, dropout: float | None = None,
                 seed: int = 0, tokenizer: str | None = None) -> HFCausalLM:
    """A transformers causal LM: ``path`` (a local ``save_pretrained`` directory, in ``dtype``), or a new one
    of ``arch`` shaped by the size knobs with random weights from ``seed``. An LM's classes are its tokens:
    ``vocab_size`` defaults to ``num_classes``, else to the size of the ``tokenizer`` directory's tokenizer."""
    knobs = {"arch": arch, "layers": layers, "hidden": hidden, "heads": heads, "kv_heads": kv_heads,
             "intermediate": intermediate, "vocab_size": vocab_size, "max_length": max_length, "dropout": dropout,
             "tokenizer": tokenizer}
    if path is not None:
        given = sorted(k for k, v in knobs.items() if v is not None)
        if given:
            raise CausalLMError(f"a causal LM from 'path' takes no size knobs (got {', '.join(given)}; they shape a "
                                f"new model); drop them or drop 'path'")
        return load_causal_lm(path, dtype)
    if vocab_size is not None and num_classes is not None and int(vocab_size) != int(num_classes):
        raise CausalLMError(f"causal LM vocab_size {vocab_size} != num_classes {num_classes} (an LM's classes are "
                            f"its tokens); give one of them")
    vocab = vocab_size if vocab_size is not None else num_classes
    if vocab is None and tokenizer is not None:
        vocab = len(require_transformers().AutoTokenizer.from_pretrained(tokenizer, local_files_only=True))
    if vocab is None:
        raise CausalLMError("a new causal LM needs its vocabulary size: give vocab_size (or a tokenizer directory)")
    shaped = {k: v for k, v in knobs.items() if v is not None and k not in ("vocab_size", "arch")}
    return random_causal_lm(arch or "llama", vocab_size=int(vocab), seed=seed, dtype=dtype, **shaped)
