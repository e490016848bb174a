"""Language-model corpora as datasets of fixed-length token windows (scheme ``lm``).

``lm_text``: text files (one document per line; default gensim's ``lee_background.cor``, 300 news documents
shipped in gensim's wheel, so a real corpus is on disk without a download), split by document into train /
val / test (the last documents are held out: no held-out text appears in a training window), each split's
documents joined with a separator token and packed into non-overlapping windows of ``seq_len`` tokens (the
tail that does not fill a window is dropped). Tokens are characters (``tokenizer: chars``, the default:
lowercased, the vocabulary is the file's characters, so uniform perplexity is the vocabulary size) or a
Hugging Face tokenizer from a local directory (``tokenizer: <dir>`` or ``all_minilm_l6_v2``).

Items are ``(input_ids (seq_len,), 0, index)``: the label slot is unused, every position is a completion
token (packed text has no prompt). The dataset's ``classes`` are the vocabulary in id order, so the splits'
``num_classes`` is the vocabulary size a model's LM head must have, and ``decode`` turns ids back into text
(the generations logged per epoch).
"""
from __future__ import annotations

import hashlib
import os
from typing import Callable

import torch
from torch.utils.data import Dataset

from kdray.data.char_corpus import lee_background_path
from kdray.data.registry import DatasetFilesMissingError, DatasetSplits, register_dataset


class TokenWindows(Dataset):
    """``(windows[i], 0, i)``: one packed window of token ids per item."""

    def __init__(self, windows: torch.Tensor):
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i):
        return self.windows[i], 0, i


def pack_windows(documents: list[torch.Tensor], separator: int | None, seq_len: int) -> torch.Tensor:
    """``documents`` joined (``separator`` between them, when given) and cut into ``(n, seq_len)`` windows."""
    parts = []
    for k, doc in enumerate(documents):
        if k and separator is not None:
            parts.append(torch.tensor([separator], dtype=torch.long))
        parts.append(doc)
    tokens = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    n = len(tokens) // seq_len
    return tokens[: n * seq_len].view(n, seq_len)


def read_documents(paths: list[str]) -> list[str]:
    """The non-empty lines of ``paths``, in order: one document each."""
    documents = []
    for path in paths:
        if not os.path.isfile(path):
            raise DatasetFilesMissingError(f"lm_text: {path!r} is not a file; give data.options.path a text file "
                                           f"(one document per line) or leave it out for gensim's Lee corpus")
        with open(path, encoding="utf-8", errors="replace") as fh:
            documents += [line.strip() for line in fh if line.strip()]
    return documents


def char_codec(documents: list[str]) -> tuple[list[str], Callable[[str], list[int]]]:
    """The sorted characters of ``documents`` (plus ``\\n``, the separator) and an encoder to their ids."""
    vocabulary = sorted(set("".join(documents)) | {"\n"})
    index = {c: i for i, c in enumerate(vocabulary)}
    return vocabulary, lambda text: [index[c] for c in text]


@register_dataset("lm_text", "text files (default gensim's Lee corpus) as packed LM token windows; options "
                             "path, tokenizer (chars | <dir>), seq_len, val_fraction, test_fraction, max_windows")
def lm_text(root=None, seed=0, path: str | list[str] | None = None, tokenizer: str = "chars", seq_len: int = 64,
            val_fraction: float = 0.1, test_fraction: float = 0.1, max_windows: int | None = None,
            lowercase: bool | None = None) -> DatasetSplits:
    if seq_len < 2:
        raise ValueError(f"lm_text: seq_len must be >= 2 (a next token to predict), got {seq_len}")
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(f"lm_text: val_fraction + test_fraction must leave training documents, got "
                         f"{val_fraction} + {test_fraction}")
    paths = [path] if isinstance(path, str) else list(path or [lee_background_path()])
    paths = [p if os.path.isabs(p) or root is None else os.path.join(root, p) for p in paths]
    documents = read_documents(paths)
    if len(documents) < 3:
        raise ValueError(f"lm_text: {', '.join(paths)} holds {len(documents)} document(s) (non-empty lines); the "
                         f"train / val / test split needs at least 3")
    chars = tokenizer == "chars"
    if lowercase if lowercase is not None else chars:
        documents = [d.lower() for d in documents]
    if chars:
        vocabulary, encode = char_codec(documents)
        separator = vocabulary.index("\n")

        def decode(ids) -> str:
            return "".join(vocabulary[int(i)] for i in ids)
    else:
        from kdray.hf_local import load_tokenizer

        tok = load_tokenizer(tokenizer)
        vocab = tok.get_vocab()
        vocabulary = [""] * len(tok)
        for token, i in vocab.items():
            if i < len(vocabulary):
                vocabulary[i] = token
        separator = next((t for t in (tok.eos_token_id, tok.sep_token_id) if t is not None), None)

        def encode(text: str) -> list[int]:
            return tok(text, add_special_tokens=False)["input_ids"]

        def decode(ids) -> str:
            return tok.decode([int(i) for i in ids])
    n = len(documents)
    n_test = max(1, int(round(n * test_fraction))) if test_fraction else 0
    n_val = max(1, int(round(n * val_fraction))) if val_fraction else 0
    cuts = {"train": documents[: n - n_val - n_test], "val": documents[n - n_val - n_test: n - n_test],
            "test": documents[n - n_test:]}
    windows = {name: pack_windows([torch.tensor(encode(d), dtype=torch.long) for d in docs], separator, seq_len)
               for name, docs in cuts.items()}
    if max_windows is not None:
        keep = torch.randperm(len(windows["train"]), generator=torch.Generator().manual_seed(seed))[:max_windows]
        windows["train"] = windows["train"][keep.sort().values]
    digest = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as fh:
            digest.update(hashlib.sha256(fh.read()).digest())
    digest.update(repr((tokenizer, seq_len, val_fraction, test_fraction, max_windows, seed, lowercase)).encode())
    return DatasetSplits(TokenWindows(windows["train"]), TokenWindows(windows["val"]), TokenWindows(windows["test"]),
                         num_classes=len(vocabulary), input_shape=(seq_len,),
                         fingerprint=f"lm_text:{digest.hexdigest()[:16]}", classes=vocabulary, decode=decode)
