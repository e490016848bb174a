"""Sentence-embedding distillation of a real teacher on CPU: all-MiniLM-L6-v2 (6 layers, hidden 384) into a
3-layer student, on gensim's Lee news corpus split into sentences.

Two students of the same shape (3 layers, hidden 384, the teacher's tokenizer), trained the same way with
``embedding_cosine`` (+ ``embedding_mse`` on L2-normalised vectors) to the teacher's mean-pooled embedding:
one initialised from the teacher's embeddings and layers 0, 2, 4 (``init_from_teacher``, DistilBERT-style),
one with random weights. Reported: the mean cosine between student and teacher embeddings on held-out
sentences (the Lee test split, never trained on), a logistic-regression probe on gensim's 200 labelled
polarity sentences (5-fold cross-validated accuracy of the embeddings, student vs teacher; a different corpus
than the one distilled on), parameters and CPU latency (one thread, a batch of 32 sentences).

The teacher's embeddings of the training sentences are computed once and fed to kdray's Distiller as the
teacher output (what a teacher cache does); the student steps are kdray's (Distiller + the registered terms).
Run: ``OMP_NUM_THREADS=1 python bench/text_embedding.py [--epochs 2 --max-train 1200]``.

Measured 2026-12-03 on the project's shared 2-core CPU box (torch 2.14.1, transformers 5.24.0, seed 0, 2 epochs,
lr 5e-4, batch 32, max 64 tokens, 522 held-out sentences, 2 training threads, latency with 1 thread):

| model | params | held-out cosine to teacher (before -> after) | polarity probe (5-fold) | latency, 32 sentences |
|---|---|---|---|---|
| teacher all-MiniLM-L6-v2 | 22.7M | 1 | 0.720 | 455 ms (first run; 930 ms in the second, a loaded box) |
| student 3 layers, init_from_teacher [0, 2, 4], 600 sentences | 17.4M (0.77x) | 0.357 -> 0.660 | 0.705 (-0.015) | 243 ms |
| student 3 layers, random, 600 sentences | 17.4M (0.77x) | 0.006 -> 0.283 | 0.475 (-0.245) | 243 ms |

(800 sentences at lr 2e-4: 0.644 / 0.283 cosine, probes 0.715 / 0.495; students 1.9x faster than the teacher.)
Most of the parameters are the shared 30522 x 384 word embeddings (11.7M), so three layers fewer take a quarter
off; the latency halves. A few hundred sentences and two epochs bring the copied layers to cosine ~0.65, far
from converged: the figures measure kdray's path, not the best student this corpus can give.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from kdray.algorithms.base import Batch, ModelOutput, create_method
from kdray.algorithms.distiller import Distiller
from kdray.data import build_datasets, collate_batch
from kdray.data.text import pang_lee_sentences, tokenize
from kdray.hf_local import load_tokenizer
from kdray.models import create_model


@torch.no_grad()
def embed(model, samples, batch_size: int = 64) -> torch.Tensor:
    """``(N, H)`` the model's embedding outputs of ``(inputs, target, index)`` samples, in order."""
    model.eval()
    out = []
    for s in range(0, len(samples), batch_size):
        inputs, _, _ = collate_batch(samples[s:s + batch_size])
        out.append(model(inputs))
    return torch.cat(out)


def probe_accuracy(embeddings: np.ndarray, labels: list[str], seed: int = 0) -> float:
    """5-fold cross-validated accuracy of a logistic regression on (normalised) embeddings."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    x = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    return float(cross_val_score(LogisticRegression(C=10.0, max_iter=2000), x, labels, cv=folds).mean())


def latency_ms(model, inputs, repeats: int = 5) -> float:
    """Median milliseconds of one forward of ``inputs`` (CPU, the current thread count)."""
    times = []
    with torch.no_grad():
        model(inputs)
        for _ in range(repeats):
            start = time.perf_counter()
            model(inputs)
            times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def distil(student, train_samples, teacher_emb: torch.Tensor, epochs: int, lr: float, seed: int) -> float:
    """Train ``student`` to the teacher's embeddings with kdray's Distiller; returns seconds taken."""
    torch.manual_seed(seed)
    terms = [create_method("embedding_cosine"), create_method("embedding_mse", weight=100.0, normalize=True)]
    distiller = Distiller(student, terms, ce_weight=0.0)
    distiller.resolve_teacher_points(student)  # teacher points are "embedding" too (given below, cached)
    loader = DataLoader(train_samples, batch_size=32, shuffle=True, collate_fn=collate_batch,
                        generator=torch.Generator().manual_seed(seed))
    inputs, _, idx = next(iter(loader))
    cached = lambda _inputs: ModelOutput(teacher_emb[idx], {"embedding": teacher_emb[idx]})  # noqa: E731
    distiller.build(inputs, cached)  # the projection is not needed (equal widths); build checks the shapes
    opt = torch.optim.AdamW(distiller.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * len(loader)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    start = time.perf_counter()
    distiller.train()
    for _ in range(epochs):
        for inputs, targets, idx in loader:
            teacher_out = ModelOutput(teacher_emb[idx], {"embedding": teacher_emb[idx]})
            _, losses = distiller(Batch(inputs, targets, idx), teacher_out)
            opt.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            opt.step()
            sched.step()
    return time.perf_counter() - start


def run(epochs: int = 2, max_train: int = 1200, lr: float = 5e-4, seed: int = 0, max_length: int = 64,
        max_test: int | None = None) -> dict:
    torch.manual_seed(seed)
    teacher = create_model("all_minilm_l6_v2", 1).eval()
    splits = build_datasets("lee_background", tokenizer="all_minilm_l6_v2", max_length=max_length, seed=seed)
    train = [splits.train[i] for i in range(min(max_train, len(splits.train)))]
    test = [splits.test[i] for i in range(min(max_test or len(splits.test), len(splits.test)))]
    t0 = time.perf_counter()
    teacher_train, teacher_test = embed(teacher, train), embed(teacher, test)
    teacher_s = time.perf_counter() - t0
    tok = load_tokenizer("all_minilm_l6_v2")
    texts, labels = pang_lee_sentences()
    polarity = [(x, 0, i) for i, x in enumerate(tokenize(texts, tok, max_length))]
    result = {"epochs": epochs, "train_sentences": len(train), "test_sentences": len(test), "seed": seed,
              "teacher_embed_s": teacher_s, "teacher": {"params": sum(p.numel() for p in teacher.parameters()),
                                                        "probe": probe_accuracy(embed(teacher, polarity).numpy(),
                                                                                labels)}}
    bench_inputs = collate_batch(test[:32])[0]
    torch.set_num_threads(1)
    result["teacher"]["latency_ms"] = latency_ms(teacher, bench_inputs)
    torch.set_num_threads(max(1, int(os.environ.get("KDRAY_BENCH_THREADS", "2"))))
    for name, knobs in (("init_from_teacher", {"init_from_teacher": [0, 2, 4]}),
                        ("random", {"layers": 3})):
        torch.manual_seed(seed)
        student = create_model("hf_text", 1, teacher="all_minilm_l6_v2", head="embedding", **knobs)
        before = torch.nn.functional.cosine_similarity(embed(student, test), teacher_test).mean().item()
        seconds = distil(student, train, teacher_train, epochs, lr, seed)
        cos = torch.nn.functional.cosine_similarity(embed(student, test), teacher_test).mean().item()
        torch.set_num_threads(1)
        lat = latency_ms(student.eval(), bench_inputs)
        torch.set_num_threads(max(1, int(os.environ.get("KDRAY_BENCH_THREADS", "2"))))
        result[name] = {"params": sum(p.numel() for p in student.parameters()), "cosine_before": before,
                        "cosine": cos, "probe": probe_accuracy(embed(student, polarity).numpy(), labels),
                        "train_s": seconds, "latency_ms": lat}
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-train", type=int, default=1200)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(max(1, int(os.environ.get("KDRAY_BENCH_THREADS", "2"))))
    import transformers

    print(f"# all-MiniLM-L6-v2 -> 3-layer student, sentence embeddings\nmachine: {platform.machine()} CPU "
          f"x{os.cpu_count()}; python {platform.python_version()}; torch {torch.__version__}; transformers "
          f"{transformers.__version__}")
    r = run(args.epochs, args.max_train, args.lr, args.seed)
    t = r["teacher"]
    print(f"{r['train_sentences']} training / {r['test_sentences']} held-out Lee sentences, {r['epochs']} epochs, "
          f"seed {r['seed']}")
    print("| model | params | held-out cosine to teacher (before -> after) | polarity probe (5-fold) | "
          "latency, 32 sentences, 1 thread |")
    print("|---|---|---|---|---|")
    print(f"| teacher all-MiniLM-L6-v2 | {t['params'] / 1e6:.1f}M | 1 | {t['probe']:.3f} | {t['latency_ms']:.0f} ms |")
    for name in ("init_from_teacher", "random"):
        s = r[name]
        print(f"| student 3 layers, {name} | {s['params'] / 1e6:.1f}M ({s['params'] / t['params']:.2f}x) | "
              f"{s['cosine_before']:.3f} -> {s['cosine']:.3f} | {s['probe']:.3f} ({s['probe'] - t['probe']:+.3f}) | "
              f"{s['latency_ms']:.0f} ms ({t['latency_ms'] / s['latency_ms']:.2f}x faster) |")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
