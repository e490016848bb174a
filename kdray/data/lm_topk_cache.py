"""Offline teacher top-k for language models, stored as Parquet: the teacher runs once, students train from the
file without loading it (TRL #2255, DistillKit's compressed logits, Megatron-LM's offline logits).

One row per token position of the packed sequences: ``sequence`` (int64, the row of the token-id tensor the
cache was made from), ``position`` (int32), ``indices`` (fixed-size list of k int32: the teacher's top-k token
ids, best first) and ``logprobs`` (fixed-size list of k float16: their log-probabilities at the cache's
temperature over the full vocabulary, so the rest mass is ``1 - sum exp``; see
:mod:`kdray.algorithms.lm.topk`). The payload is ``6k`` bytes per token before Parquet's encoding and
compression; :func:`bytes_per_token` reports what the file really costs. The schema metadata holds k, the
temperature, the vocabulary size, the sequence length and a fingerprint of teacher weights, tokenizer and token
ids (:func:`lm_cache_fingerprint`), so a reader can refuse a cache made by another teacher or for other data.
Writes go to a temporary name and are renamed into place, so a killed writer never leaves a half file.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch

from kdray.data.parquet_io import write_parquet_atomically

SCHEMA_KEY = b"kdray.lm_topk"


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable digest of a tokenizer: its ``get_vocab()`` mapping (transformers), or a given identity string."""
    if isinstance(tokenizer, str):
        text = tokenizer
    elif hasattr(tokenizer, "get_vocab"):
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    else:
        raise TypeError(f"tokenizer fingerprint needs a str or an object with get_vocab(), got {type(tokenizer)}")
    return hashlib.sha256(text.encode()).hexdigest()


def lm_cache_fingerprint(teacher_state: dict, tokenizer, token_ids, k: int, temperature: float) -> str:
    """sha256 over the teacher's state dict (``teacher.state_dict()``: parameter and buffer names, dtypes,
    shapes, bytes), the tokenizer, the token ids (a tensor or an array), k and the temperature: any change makes
    another cache. It takes the state dict, not the module, so a driver can fingerprint a teacher it never builds."""
    digest = hashlib.sha256()
    for name, tensor in sorted(teacher_state.items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    ids = torch.as_tensor(token_ids).detach().cpu().long().contiguous()
    digest.update(f"{tuple(ids.shape)}".encode() + ids.numpy().tobytes())
    digest.update(f"k={k};T={float(temperature)!r}".encode())
    return digest.hexdigest()


@dataclass
class LMTopKCache:
    """A cache read back: ``indices`` (N, L, k) int64, ``logprobs`` (N, L, k) float32 (float16 on disk)."""

    indices: torch.Tensor
    logprobs: torch.Tensor
    temperature: float
    vocab_size: int
    fingerprint: str
    path: str

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    def rows(self, sequences: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k indices and log-probs of the given sequence rows, ``(B, L, k)`` each."""
        return self.indices[sequences], self.logprobs[sequences]


def write_lm_topk_parquet(path: str, indices: torch.Tensor, logprobs: torch.Tensor, *, temperature: float,
                          vocab_size: int, fingerprint: str) -> str:
    """Write the top-k ``indices`` / ``logprobs`` of N sequences of L positions, ``(N, L, k)``, atomically."""
    import numpy as np
    import pyarrow as pa

    if indices.shape != logprobs.shape or indices.dim() != 3:
        raise ValueError(f"lm top-k cache needs indices and logprobs of one shape (N, L, k), got "
                         f"{tuple(indices.shape)} and {tuple(logprobs.shape)}")
    if vocab_size > np.iinfo(np.int32).max:
        raise ValueError(f"lm top-k cache stores int32 token ids, vocabulary {vocab_size} does not fit")
    n, length, k = indices.shape
    flat_ids = indices.detach().cpu().to(torch.int32).reshape(-1).numpy()
    flat_values = logprobs.detach().cpu().to(torch.float16).reshape(-1).numpy()
    table = pa.table({
        "sequence": pa.array(np.repeat(np.arange(n, dtype=np.int64), length)),
        "position": pa.array(np.tile(np.arange(length, dtype=np.int32), n)),
        "indices": pa.FixedSizeListArray.from_arrays(pa.array(flat_ids, pa.int32()), k),
        "logprobs": pa.FixedSizeListArray.from_arrays(pa.array(flat_values, pa.float16()), k),
    })
    meta = {"k": k, "temperature": float(temperature), "vocab_size": int(vocab_size), "length": length,
            "sequences": n, "fingerprint": fingerprint}
    return write_parquet_atomically(table, path, SCHEMA_KEY, meta)


def read_lm_topk_metadata(path: str) -> dict:
    """The cache's identity (``k``, ``temperature``, ``vocab_size``, ``length``, ``sequences``, ``fingerprint``)
    from the Parquet schema alone: what a reader needs to know before it reads the rows (e.g. the k the
    expected fingerprint is computed with)."""
    import pyarrow.parquet as pq

    raw = (pq.read_schema(path).metadata or {}).get(SCHEMA_KEY)
    if raw is None:
        raise ValueError(f"{path} is not a kdray LM top-k cache (no {SCHEMA_KEY.decode()} schema metadata)")
    return json.loads(raw)


def read_lm_topk_parquet(path: str, expected_fingerprint: str | None = None) -> LMTopKCache:
    """Read a cache written by :func:`write_lm_topk_parquet`; a fingerprint other than ``expected_fingerprint``
    fails in one line (the teacher, tokenizer, data, k or temperature changed since the cache was made) before
    the rows are read."""
    import numpy as np
    import pyarrow.parquet as pq

    meta = read_lm_topk_metadata(path)
    if expected_fingerprint is not None and meta["fingerprint"] != expected_fingerprint:
        raise ValueError(f"{path} was made with fingerprint {meta['fingerprint'][:12]}, expected "
                         f"{expected_fingerprint[:12]}: the teacher, tokenizer, token ids, k or temperature "
                         f"differ; rebuild the cache")
    table = pq.read_table(path)
    n, length, k = meta["sequences"], meta["length"], meta["k"]
    order = np.lexsort((table["position"].to_numpy(), table["sequence"].to_numpy()))
    ids = table["indices"].combine_chunks().flatten().to_numpy().reshape(-1, k)[order]
    values = table["logprobs"].combine_chunks().flatten().to_numpy().reshape(-1, k)[order]
    return LMTopKCache(indices=torch.from_numpy(ids.astype(np.int64)).reshape(n, length, k),
                       logprobs=torch.from_numpy(values.astype(np.float32)).reshape(n, length, k),
                       temperature=meta["temperature"], vocab_size=meta["vocab_size"],
                       fingerprint=meta["fingerprint"], path=path)


def bytes_per_token(path: str) -> float:
    """The file's size on disk divided by the number of token positions it holds."""
    import pyarrow.parquet as pq

    return os.path.getsize(path) / pq.ParquetFile(path).metadata.num_rows
