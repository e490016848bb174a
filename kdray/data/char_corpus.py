"""A character-level corpus from a text file, for tiny language models trained in seconds on a CPU.

The default file is gensim's ``lee_background.cor`` (300 news documents, 360 KB, shipped inside gensim's wheel
and found with ``gensim.test.utils.datapath``), so a real corpus is on disk without a download. Documents are
lines; the last ``held_out`` fraction of documents is the held-out split, so no held-out text appears in
training windows. Text is lowercased; the vocabulary is the characters of the whole file (sorted), so uniform
perplexity is the vocabulary size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def lee_background_path() -> str:
    """The path of gensim's ``lee_background.cor``; needs gensim (``pip install gensim``)."""
    try:
        from gensim.test.utils import datapath
    except ImportError as err:
        raise ImportError("the Lee background corpus ships with gensim: pip install gensim") from err
    return datapath("lee_background.cor")


@dataclass
class CharCorpus:
    """Encoded train and held-out text and the character vocabulary."""

    train: torch.Tensor
    held_out: torch.Tensor
    vocabulary: list[str]

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)

    def windows(self, split: str, count: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` random windows of ``length`` characters from ``split`` ("train" or "held_out")."""
        text = self.train if split == "train" else self.held_out
        starts = torch.randint(0, len(text) - length, (count,), generator=generator)
        return torch.stack([text[s:s + length] for s in starts.tolist()])


def load_char_corpus(path: str, held_out: float = 0.1) -> CharCorpus:
    """Read ``path`` (one document per line), lowercase it and split the documents train / held-out."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        documents = [line.strip().lower() for line in fh if line.strip()]
    if len(documents) < 2:
        raise ValueError(f"{path}: a character corpus needs at least 2 documents (lines), got {len(documents)}")
    cut = max(1, int(round(len(documents) * (1 - held_out))))
    train_text, held_text = "\n".join(documents[:cut]), "\n".join(documents[cut:])
    vocabulary = sorted(set(train_text + held_text))
    index = {c: i for i, c in enumerate(vocabulary)}

    def encode(text: str) -> torch.Tensor:
        return torch.tensor([index[c] for c in text], dtype=torch.long)

    return CharCorpus(encode(train_text), encode(held_text), vocabulary)
