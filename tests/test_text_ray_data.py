"""Ray Data tokenisation of a text corpus (``data.options.tokenize_with: ray``): the Parquet file it writes reads
back as the same dataset, row for row, as in-process tokenisation; a job's builds tokenise once, into the job
directory; missing columns and misused options fail in one line.

Corpora: gensim's shipped ``lee_background.cor`` (plain text, 300 news documents) and ``pang_lee_polarity.cor``
(200 labelled sentences) written here as JSONL, CSV and Parquet."""
import csv
import json

import pytest
import torch

pytest.importorskip("transformers")

from jobs import digits_job  # noqa: E402
from kdray.data.text import (TextColumnError, TokenizeTable, gensim_corpus, pang_lee_sentences,  # noqa: E402
                             read_tokenized, text_files)

TOKENIZER = "all_minilm_l6_v2"
MAX_LENGTH = 48  # short enough that many lee sentences are truncated: truncation is compared too


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """pang_lee_polarity as JSONL / CSV / Parquet with extra columns (the text and label columns are not first),
    and lee_background.cor as it ships."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("corpora")
    texts, labels = pang_lee_sentences()
    rows = [{"id": i, "sentence": t, "polarity": lab} for i, (t, lab) in enumerate(zip(texts, labels))]
    (root / "pl.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with open(root / "pl.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "sentence", "polarity"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), root / "pl.parquet")
    return {"jsonl": root / "pl.jsonl", "csv": root / "pl.csv", "parquet": root / "pl.parquet",
            "text": gensim_corpus("lee_background.cor")}


LABELLED = dict(text_column="sentence", label_column="polarity", task="classification")
CASES = {"jsonl": LABELLED, "csv": LABELLED, "parquet": LABELLED,
         "text": dict(text_column="text", label_column=None, task="masked_lm")}  # masking runs on the read ids


def assert_same_dataset(a, b):
    assert (a.fingerprint, a.classes, a.num_classes, a.input_shape) == (b.fingerprint, b.classes, b.num_classes,
                                                                         b.input_shape)
    for split_a, split_b in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        assert len(split_a) == len(split_b) > 0
        assert split_a.texts == split_b.texts
        for i in range(len(split_a)):
            (xa, ya, ia), (xb, yb, ib) = split_a[i], split_b[i]
            assert set(xa) == set(xb) == {"input_ids", "attention_mask", "token_type_ids"} and ia == ib == i
            for key in xa:
                assert xa[key].dtype == xb[key].dtype == torch.long and torch.equal(xa[key], xb[key]), (i, key)
            assert torch.equal(torch.as_tensor(ya), torch.as_tensor(yb)), i


@pytest.mark.ray
@pytest.mark.parametrize("fmt", list(CASES))
def test_ray_data_tokens_equal_in_process_row_for_row(ray_session, corpora, tmp_path, fmt):
    import pyarrow.parquet as pq

    from kdray.orchestrator.text_tokens import tokenize_on_ray

    opts = CASES[fmt]
    out = tokenize_on_ray(corpora[fmt], tmp_path / "tokens.parquet", tokenizer=TOKENIZER, max_length=MAX_LENGTH,
                          text_column=opts["text_column"], label_column=opts["label_column"], concurrency=2,
                          batch_rows=64)  # several batches, so the order across them is checked
    schema = pq.read_schema(out)
    assert str(schema.field("input_ids").type) == "list<element: int32>" and "attention_mask" not in schema.names
    common = dict(path=str(corpora[fmt]), tokenizer=TOKENIZER, max_length=MAX_LENGTH, seed=3, **opts)
    in_process = text_files(**common)
    assert_same_dataset(in_process, text_files(tokenized=str(out), **common))
    n = len(in_process.train) + len(in_process.val) + len(in_process.test)
    assert n == (200 if fmt != "text" else 300)
    assert max(len(e["input_ids"]) for e in read_tokenized(out)[0]) == MAX_LENGTH  # truncated as in-process
    with pytest.raises(ValueError, match=r"was made with other max_length \(max_length=48\)"):
        text_files(tokenized=str(out), **{**common, "max_length": 32})


def test_missing_text_column_names_the_columns_present(corpora, tmp_path):
    """Refused before Ray starts: the file's columns are read from its header / schema / first rows."""
    from kdray.orchestrator.text_tokens import tokenize_on_ray

    for fmt in ("jsonl", "csv", "parquet"):
        with pytest.raises(TextColumnError, match=r"pl\.\w+ has no text_column 'text'; its columns: id, sentence, "
                                                  r"polarity \(give data.options.text_column\)$"):
            tokenize_on_ray(corpora[fmt], tmp_path / "t.parquet", tokenizer=TOKENIZER, text_column="text",
                            label_column="polarity")
        with pytest.raises(TextColumnError, match=r"has no label_column 'label'; its columns: id, sentence"):
            tokenize_on_ray(corpora[fmt], tmp_path / "t.parquet", tokenizer=TOKENIZER, text_column="sentence")
    assert not (tmp_path / "t.parquet").exists()


def test_a_batch_without_the_text_column_names_the_batch_columns():
    """Inside a Ray Data task (a JSONL row beyond the first 100 may lack keys): the same one-line error."""
    import pyarrow as pa

    tokenize = TokenizeTable(TOKENIZER, MAX_LENGTH, text_column="sentence", label_column=None, fmt="jsonl",
                             source="big.jsonl")
    table = tokenize(pa.table({"sentence": ["a fine film", "a mess"], "id": [1, 2]}))
    assert table.column("length").to_pylist() == [len(i) for i in table.column("input_ids").to_pylist()]
    with pytest.raises(TextColumnError, match=r"^big.jsonl has no text_column 'sentence'; its columns: body, id"):
        tokenize(pa.table({"body": ["x"], "id": [1]}))


def test_tokenize_with_options_fail_in_one_line(corpora):
    with pytest.raises(ValueError, match=r"tokenize_with is 'spark'; allowed: process, ray$"):
        text_files(path=str(corpora["jsonl"]), tokenizer=TOKENIZER, tokenize_with="spark", **LABELLED)
    with pytest.raises(ValueError, match="tokenize_with: ray runs in kdray's orchestrator"):
        text_files(path=str(corpora["jsonl"]), tokenizer=TOKENIZER, tokenize_with="ray", **LABELLED)
    with pytest.raises(ValueError, match="is not a kdray tokenised text file"):
        text_files(path=str(corpora["jsonl"]), tokenizer=TOKENIZER, tokenized=str(corpora["parquet"]), **LABELLED)


@pytest.mark.ray
def test_a_job_tokenises_once_into_its_job_directory(ray_session, corpora, tmp_path, monkeypatch):
    from kdray.config import Config
    from kdray.orchestrator import text_tokens
    from kdray.orchestrator.build import build_splits

    def job(tokenize_with):
        cfg = digits_job(tmp_path, name=f"j-{tokenize_with}")
        cfg["data"] = {"name": "text_files", "options": {"path": str(corpora["csv"]), "tokenize_with": tokenize_with,
                                                         "max_length": MAX_LENGTH, **LABELLED}}
        cfg["teacher"] = {"model": "all_minilm_l6_v2", "args": {"head": "classification"}, "pretrained": True}
        cfg["student"] = {"model": "hf_text", "args": {"teacher": TOKENIZER, "layers": 1, "hidden": 32, "heads": 4,
                                                       "intermediate": 64}}
        return Config(**cfg)

    cfg = job("ray")
    on_ray = build_splits(cfg)
    (written,) = (tmp_path / "runs" / "j-ray" / "tokens").glob("*.parquet")
    assert_same_dataset(build_splits(job("process")), on_ray)

    def no_second_pass(*args, **kwargs):
        raise AssertionError("the corpus was tokenised again")

    monkeypatch.setattr(text_tokens, "tokenize_on_ray", no_second_pass)
    before = written.stat().st_mtime_ns
    assert_same_dataset(build_splits(cfg), on_ray)  # every later build (worker, task, check) reads the file
    assert written.stat().st_mtime_ns == before
    assert sorted(p.name for p in written.parent.iterdir()) == [written.name]  # no temporary file left


@pytest.mark.ray
def test_a_text_job_trains_on_ray_data_tokens(ray_session, corpora, tmp_path):
    """Through kdray.distill: the preflight's build tokenises, the stage's build reads the same file."""
    import kdray
    from kdray.models import create_model

    torch.manual_seed(0)
    teacher = tmp_path / "teacher"
    create_model("hf_text", 2, head="classification", teacher=TOKENIZER, layers=1, hidden=32, heads=4,
                 intermediate=64).save_pretrained(teacher)
    cfg = digits_job(tmp_path)
    cfg["data"] = {"name": "text_files", "options": {"path": str(corpora["parquet"]), "tokenize_with": "ray",
                                                     "max_length": MAX_LENGTH, **LABELLED}}
    cfg["teacher"] = {"model": "hf_text", "args": {"path": str(teacher)}, "pretrained": True}
    cfg["student"] = {"model": "hf_text", "args": {"teacher": str(teacher), "layers": 1, "hidden": 16, "heads": 2,
                                                   "intermediate": 32}}
    cfg["train"] = {"epochs": 1, "lr": 0.005, "batch_size": 16, "optimizer": "adamw"}
    (stage,) = kdray.distill(cfg).stages
    assert stage["kind"] == "distill" and 0.0 <= stage["test_top1"] <= 1.0
    (written,) = (tmp_path / "runs" / "t" / "tokens").glob("*.parquet")
    assert len(read_tokenized(written)[1]) == 200
