"""Text files and gensim corpora as datasets: columns, formats, tokenised once with the teacher's tokenizer,
BERT masking, vocabulary mismatch, one-line errors."""
import csv
import json

import pytest
import torch

pytest.importorskip("transformers")

from kdray.data import build_datasets, collate_batch  # noqa: E402
from kdray.data.text import (TextColumnError, lee_background_texts, mask_tokens, pang_lee_sentences,  # noqa: E402
                             read_table)
from kdray.models import create_model  # noqa: E402
from kdray.hf_local import load_tokenizer, minilm_dir  # noqa: E402
from kdray.models.text import vocab_mismatch  # noqa: E402

ROWS = [{"text": "a fine film", "label": "pos", "id": 1}, {"text": "dull and long", "label": "neg", "id": 2},
        {"text": "great acting", "label": "pos", "id": 3}, {"text": "a mess", "label": "neg", "id": 4}] * 3


def write_all(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label", "id"])
        w.writeheader()
        w.writerows(ROWS)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    (tmp_path / "d.txt").write_text("\n".join(r["text"] for r in ROWS) + "\n\n")


def test_every_format_reads_the_same_rows(tmp_path):
    write_all(tmp_path)
    expected = [r["text"] for r in ROWS], [r["label"] for r in ROWS]
    for name in ("d.jsonl", "d.csv", "d.parquet"):
        assert read_table(tmp_path / name) == expected, name
    assert read_table(tmp_path / "d.txt") == (expected[0], None)  # plain text: one text a line, blank lines out


def test_missing_column_names_the_columns_found(tmp_path):
    write_all(tmp_path)
    for name in ("d.jsonl", "d.csv", "d.parquet"):
        with pytest.raises(TextColumnError, match=r"has no text_column 'sentence'; its columns: text, label, id"):
            read_table(tmp_path / name, text_column="sentence")
    with pytest.raises(ValueError, match="has no label_column 'y'"):
        build_datasets("text_files", path=str(tmp_path / "d.csv"), label_column="y", tokenizer="all_minilm_l6_v2")


def test_text_files_tokenised_with_the_teachers_tokenizer(tmp_path):
    write_all(tmp_path)
    splits = build_datasets("text_files", path=str(tmp_path / "d.jsonl"), tokenizer="all_minilm_l6_v2",
                            val_fraction=0.25, test_fraction=0.25)
    assert splits.classes == ["neg", "pos"] and (len(splits.train), len(splits.val), len(splits.test)) == (6, 3, 3)
    tok = load_tokenizer(minilm_dir())
    x, y, i = splits.train[0]
    text = splits.train.texts[0]
    assert x["input_ids"].tolist() == tok(text)["input_ids"] and i == 0
    assert y == splits.classes.index(dict((r["text"], r["label"]) for r in ROWS)[text])
    inputs, targets, _ = collate_batch([splits.train[j] for j in range(3)])
    assert inputs["input_ids"].shape[1] == max(len(splits.train[j][0]["input_ids"]) for j in range(3))
    with pytest.raises(ValueError, match="needs the teacher's tokenizer"):
        build_datasets("text_files", path=str(tmp_path / "d.jsonl"))


def test_bert_masking_by_its_rules():
    g = torch.Generator().manual_seed(0)
    ids = torch.arange(1000, 3000)
    special = torch.zeros(2000, dtype=torch.bool)
    special[[0, -1]] = True
    masked, labels = mask_tokens(ids, special, mask_id=103, vocab_size=30522, generator=g)
    chosen = labels != -100
    assert not chosen[0] and not chosen[-1]  # [CLS] / [SEP] never predicted
    assert torch.equal(labels[chosen], ids[chosen])  # labels are the original tokens
    assert torch.equal(masked[~chosen], ids[~chosen])  # unchosen tokens untouched
    frac = chosen.float().mean().item()
    as_mask = (masked[chosen] == 103).float().mean().item()
    kept = (masked[chosen] == ids[chosen]).float().mean().item()
    assert 0.13 < frac < 0.17 and 0.74 < as_mask < 0.86 and 0.05 < kept < 0.16  # 15%; 80% [MASK]; ~10% kept


def test_gensim_corpora():
    texts, labels = pang_lee_sentences()
    assert len(texts) == 200 and labels.count("pos") == labels.count("neg") == 100
    assert len(lee_background_texts("documents")) == 300
    sentences = lee_background_texts()
    assert len(sentences) > 2000 and all(len(s.split()) >= 4 for s in sentences)
    splits = build_datasets("lee_background", tokenizer="all_minilm_l6_v2", task="masked_lm")
    _x, y, _ = splits.train[0]
    assert y.shape == splits.train[0][0]["input_ids"].shape and (y != -100).any()


def test_vocab_mismatch_is_one_line():
    small = create_model("hf_text", 2, teacher="all_minilm_l6_v2", layers=1, hidden=32, heads=2, vocab=1000)
    reason = vocab_mismatch("all_minilm_l6_v2", small)
    assert reason is not None and "\n" not in reason and "vocab=30522" in reason
    fine = create_model("hf_text", 2, teacher="all_minilm_l6_v2", layers=1, hidden=32, heads=2)
    assert vocab_mismatch("all_minilm_l6_v2", fine) is None


def test_a_text_dataset_without_a_tokenizer_takes_the_teachers(tmp_path):
    """data.options.tokenizer defaults to the first teacher's directory (hf_text args.path, or the shipped
    all_minilm_l6_v2); a given tokenizer and non-text data are left alone."""
    from jobs import digits_job

    from kdray.config import load_config

    def job(teacher, options, data="pang_lee_polarity"):
        cfg = digits_job(tmp_path)
        cfg["data"] = {"name": data, "options": options}
        cfg["teacher"] = {**teacher, "pretrained": True}
        cfg["student"] = {"model": "hf_text", "args": {"layers": 1}}
        return load_config(cfg)

    teacher_dir = str(tmp_path / "teacher")
    assert job({"model": "hf_text", "args": {"path": teacher_dir}}, {}).data.options["tokenizer"] == teacher_dir
    assert job({"model": "all_minilm_l6_v2"}, {}).data.options["tokenizer"] == "all_minilm_l6_v2"
    given = job({"model": "hf_text", "args": {"path": teacher_dir}}, {"tokenizer": "all_minilm_l6_v2"})
    assert given.data.options["tokenizer"] == "all_minilm_l6_v2"
    no_path = job({"model": "hf_text", "args": {"layers": 2}}, {})
    assert "tokenizer" not in no_path.data.options  # nothing to take: the data builder's one-line error stands
