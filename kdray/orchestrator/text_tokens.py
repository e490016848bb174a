"""Tokenising a large text corpus with Ray Data, once per job (``data.options.tokenize_with: ray``).

Why: :mod:`kdray.data.text` tokenises a file in the builder's process, and every worker, task and check builds
the splits again, so a large corpus is tokenised on one core as many times as there are builders. With
``tokenize_with: ray`` the first build reads the file with ``ray.data.read_{json,csv,parquet,text}``, tokenises
it in ``map_batches`` tasks (:class:`~kdray.data.text.TokenizeTable`: the teacher's fast tokenizer, loaded once
per worker process, pyarrow batches) and writes one Parquet file, ``<job dir>/tokens/<key>.parquet`` (``input_ids``
``list<int32>``, ``length``, ``text``, ``label``); every build then reads that file
(``data.options.tokenized``), with the same splits, fingerprint and dynamic padding as the in-process path.

The key hashes the corpus's bytes, the tokenizer's vocabulary and directory, ``max_length`` and the columns, so
another corpus or tokenizer gets another file and an unchanged one is never tokenised twice. Rows keep the
file's order (Ray Data's ``preserve_order``) and the driver streams the batches into one file, written under a
temporary name and renamed into place: a killed run leaves no half file, and two builders racing write the same
bytes. The data layer may not import Ray; this module is the orchestrator's half of the switch.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

from kdray.data import DatasetFilesMissingError
from kdray.data.lm_topk_cache import tokenizer_fingerprint
from kdray.data.text import (TOKENS_META_KEY, TokenizeTable, check_columns, csv_delimiter, encoding_keys,
                             peek_columns, text_format, text_source, tokenizer_dir, tokens_meta, used_label_column)
from kdray.hf_local import load_tokenizer

DEFAULT_BATCH_ROWS = 1024


@functools.lru_cache(maxsize=4)
def _tokenize_table(**options) -> TokenizeTable:
    return TokenizeTable(**options)


def tokenize_batch(table, **options):
    """A Ray Data task's batch through :class:`~kdray.data.text.TokenizeTable`, the tokenizer loaded once per
    worker process. Tasks, not an actor pool: Ray reuses its worker processes, so a second corpus (or the next
    job on the cluster) skips the seconds an actor spends importing torch and transformers."""
    return _tokenize_table(**options)(table)


def _read(source: Path, fmt: str, text_column: str, label_column: str | None):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import ray.data

    path = str(source)
    if fmt == "text":
        return ray.data.read_text(path, encoding="utf-8")
    wanted = [c for c in (text_column, label_column) if c is not None]
    if fmt == "parquet":
        return ray.data.read_parquet(path, columns=wanted)
    if fmt == "csv":  # every cell a string, as csv.DictReader reads it ("01" stays "01")
        return ray.data.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=csv_delimiter(source)),
                                 convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in wanted},
                                                                      include_columns=wanted))
    return ray.data.read_json(path, lines=True)


def tokenize_on_ray(source: str | Path, output: str | Path, *, tokenizer: str, max_length: int = 128,
                    text_column: str = "text", label_column: str | None = "label", fmt: str | None = None,
                    concurrency: int | None = None, batch_rows: int = DEFAULT_BATCH_ROWS) -> Path:
    """Tokenise the file ``source`` with Ray Data into the Parquet file ``output`` (Ray must be up); returns it.
    A missing text or label column fails here, before Ray starts work, naming the columns the file has."""
    import pyarrow.parquet as pq
    import ray
    from ray.data import DataContext, TaskPoolStrategy

    source, output = Path(source), Path(output)
    fmt = text_format(source, fmt)
    if not source.is_file():
        raise DatasetFilesMissingError(f"text file {source} does not exist")
    if fmt != "text":
        check_columns(source, peek_columns(source, fmt), text_column, label_column)
    tok = load_tokenizer(tokenizer_dir(tokenizer))
    meta = tokens_meta(source=str(source), tokenizer=tokenizer, max_length=max_length, text_column=text_column,
                       label_column=label_column, keys=encoding_keys(tok))
    size = concurrency or max(1, min(4, int(ray.cluster_resources().get("CPU", 1))))
    context = DataContext.get_current()
    ordered, v2 = context.execution_options.preserve_order, context.use_datasource_v2
    context.execution_options.preserve_order = True  # the splits are by row position: keep the file's order
    # Ray 2.60's V2 Parquet read (a ListFiles task, then ReadFiles) took 9-18 s for a 200-row file here, the
    # V1 read 0.2 s (measured on the 2-core box); the other formats read the same either way.
    context.use_datasource_v2 = False
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    writer = None
    try:
        ds = _read(source, fmt, text_column, label_column).map_batches(
            tokenize_batch, batch_format="pyarrow", batch_size=int(batch_rows), num_cpus=1,
            compute=TaskPoolStrategy(size=size),
            fn_kwargs=dict(tokenizer=str(tokenizer), max_length=max_length, text_column=text_column,
                           label_column=label_column, fmt=fmt, source=str(source)))
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            if writer is None:
                schema = batch.schema.with_metadata({TOKENS_META_KEY: json.dumps(meta).encode()})
                writer = pq.ParquetWriter(tmp, schema)
            writer.write_table(batch.cast(writer.schema))
        if writer is None:
            raise ValueError(f"{source.name} holds no texts to tokenise")
        writer.close()
        os.replace(tmp, output)
    finally:
        context.execution_options.preserve_order, context.use_datasource_v2 = ordered, v2
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    return output


def tokens_key(source: Path, tokenizer: str, max_length: int, text_column: str, label_column: str | None,
               fmt: str) -> str:
    """A digest of everything the tokenised rows depend on: the corpus's bytes, the tokenizer, the options."""
    digest = hashlib.sha256()
    with open(source, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    directory = tokenizer_dir(tokenizer)
    digest.update(json.dumps([str(directory), tokenizer_fingerprint(load_tokenizer(directory)), int(max_length),
                              text_column, label_column, fmt]).encode())
    return digest.hexdigest()[:24]


def tokenized_options(dataset: str, options: dict, root: str | None, job_dir: str,
                      ray_address: str | None = None) -> dict:
    """The ``text_files`` builder options with ``tokenize_with: ray`` acted on: the corpus tokenised on Ray into
    ``<job_dir>/tokens/`` (once; an existing file is reused) and named as ``tokenized``. Other datasets' and
    other options are returned unchanged."""
    if dataset != "text_files" or options.get("tokenize_with", "process") != "ray" or options.get("tokenized"):
        return options
    from kdray.orchestrator.runtime import ensure_ray

    source = text_source(options.get("path"), root)
    fmt = text_format(source, options.get("format"))
    text_column = options.get("text_column", "text")
    label_column = used_label_column(options.get("task", "classification"), options.get("label_column", "label"))
    tokenizer, max_length = options.get("tokenizer"), int(options.get("max_length", 128))
    if tokenizer is None:
        raise ValueError("data.options.tokenize_with: ray needs the teacher's tokenizer: give data.options.tokenizer "
                         "or a teacher hf_text with args.path")
    if not source.is_file():
        raise DatasetFilesMissingError(f"text file {source} does not exist")
    key = tokens_key(source, tokenizer, max_length, text_column, label_column, fmt)
    output = Path(job_dir) / "tokens" / f"{key}.parquet"
    if not output.is_file():
        if fmt != "text":  # the one-line column error before Ray starts
            check_columns(source, peek_columns(source, fmt), text_column, label_column)
        ensure_ray(ray_address)
        tokenize_on_ray(source, output, tokenizer=tokenizer, max_length=max_length, text_column=text_column,
                        label_column=label_column, fmt=fmt, concurrency=options.get("tokenize_concurrency"))
    return {**options, "tokenized": str(output)}
