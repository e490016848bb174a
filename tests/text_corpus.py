"""Tiny text teachers trained once on a labelled slice of a shipped corpus, for the Ray Train and sweep tests.

Data: the first 400 sentences of gensim's Lee corpus (``lee_background.cor``), labelled by whether they contain a
digit (29.5 % do), a label a tiny BERT learns in a few epochs. Models are ``hf_text`` BERTs with random weights
from size knobs (MiniLM's tokenizer and vocabulary), saved with ``save_pretrained`` with dropout off (so runs
on different placements differ only by float rounding); the teachers are then trained by a plain AdamW loop.
"""
from __future__ import annotations

import json
import re

import torch

from kdray.data import build_datasets, collate_batch
from kdray.models import create_model

SENTENCES = 400


def save_text_model(directory, seed: int, layers: int, hidden: int = 32, heads: int = 4):
    """A random ``hf_text`` classifier saved without dropout; returns it reloaded from ``directory``."""
    torch.manual_seed(seed)
    model = create_model("hf_text", 2, teacher="all_minilm_l6_v2", layers=layers, hidden=hidden, heads=heads,
                         intermediate=2 * hidden)
    model.hf.config.hidden_dropout_prob = model.hf.config.attention_probs_dropout_prob = 0.0
    model.save_pretrained(directory)
    return create_model("hf_text", 2, path=str(directory))  # reloaded: built without dropout


def train_on_labels(model, splits, epochs: int = 4, seed: int = 0):
    """A plain AdamW loop on the labels: the teachers are trained once, outside the jobs under test."""
    loader = torch.utils.data.DataLoader(splits.train, batch_size=16, shuffle=True, collate_fn=collate_batch,
                                         generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.005)
    model.train()
    for _ in range(epochs):
        for inputs, targets, _ in loader:
            loss = torch.nn.functional.cross_entropy(model(inputs), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def digit_corpus(root, teacher_layers=(2, 3)) -> dict:
    """Under ``root``: the labelled JSONL, a random student directory (2 layers) and one trained teacher
    directory per entry of ``teacher_layers``."""
    from kdray.data.text import lee_background_texts

    data = root / "lee_digits.jsonl"
    data.write_text("\n".join(json.dumps({"text": s, "label": "number" if re.search(r"\d", s) else "none"})
                              for s in lee_background_texts()[:SENTENCES]))
    save_text_model(root / "student", 2, layers=2)
    teachers = []
    for k, layers in enumerate(teacher_layers):
        model = save_text_model(root / f"teacher{k}", 10 + k, layers)
        splits = build_datasets("text_files", path=str(data), tokenizer=str(root / f"teacher{k}"))
        train_on_labels(model, splits, seed=k).save_pretrained(root / f"teacher{k}")
        teachers.append(str(root / f"teacher{k}"))
    return {"data": str(data), "student": str(root / "student"), "teachers": teachers}


def text_job(tmp_path, corpus: dict, name: str, workers: int, mlflow_uri, teachers: list[str], methods: list,
             train: dict) -> dict:
    """A job on the digit corpus: one pretrained teacher (offline) or several (multi_teacher, sharded)."""
    from jobs import digits_job

    cfg = digits_job(tmp_path, mlflow_uri, name=name, ray__num_workers=workers, checkpoint__every_epochs=3)
    cfg["data"] = {"name": "text_files", "options": {"path": corpus["data"], "tokenizer": corpus["teachers"][0]}}
    specs = [{"model": "hf_text", "args": {"path": t}, "pretrained": True} for t in teachers]
    if len(specs) == 1:
        cfg["teacher"] = specs[0]
    else:
        cfg.pop("teacher")
        cfg.update(scheme="multi_teacher", teachers=specs, ensemble={"shard": True, "combine": "mean"})
    cfg["student"] = {"model": "hf_text", "args": {"path": corpus["student"]}}
    cfg["methods"], cfg["train"] = methods, dict(train)
    return cfg
