"""Must-show for LM distillation: a tiny character teacher trained on a real corpus (gensim's Lee background
news, 300 documents) until its held-out perplexity is far below uniform, then a smaller student trained on the
same token windows with cross-entropy (the baseline) and with forward KL, reverse KL and GKD's JSD (beta 0.5)
against the teacher. Metric: held-out perplexity *under the teacher's distribution*,
``exp(mean_t H(p_teacher, p_student))`` (lower is better; the teacher's own value is its floor), and the
student's ordinary held-out perplexity on the true characters, over seeds (mean, min and max per loss).

Every student sees the same windows in the same order (the window sampler is seeded per seed, not per loss).

Measured (defaults, seeds 0 1 2, 1 thread, 1002 s on a loaded 2-core CPU): teacher held-out perplexity 5.77
(uniform 55). Perplexity under the teacher, mean [min, max]: CE 11.970 [11.783, 12.081]; forward KL 11.174
[10.867, 11.360] (beats CE on every seed: its worst is 0.42 below CE's best); JSD(0.5) 11.774 [11.513, 11.927]
(0.195 below CE on the mean, the ranges overlap); reverse KL 13.439 [13.325, 13.599] does **not** beat CE
(+1.469: mode-seeking, a 1x32 student drops the teacher's minor modes, which this cross-entropy-under-the-teacher
metric charges for). True held-out perplexity: CE 11.16, forward KL 10.78, JSD 11.47, reverse KL 13.19.
Run: ``python bench/lm_perplexity.py [--seeds 0 1 2] [--teacher-steps 600] [--student-steps 300] [--threads 1]``.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))

from kdray.algorithms.lm.token_loss import token_distill_loss  # noqa: E402
from kdray.data.char_corpus import CharCorpus, lee_background_path, load_char_corpus  # noqa: E402
from kdray.models.causal_lm import tiny_causal_lm  # noqa: E402

LOSSES = {"ce": None, "forward_kl": {}, "reverse_kl": {}, "jsd": {"beta": 0.5}}


def train_teacher(corpus: CharCorpus, steps: int, length: int = 64, batch: int = 32, seed: int = 0):
    teacher = tiny_causal_lm(corpus.vocab_size, layers=2, width=96, heads=4, max_length=length, seed=seed)
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(1000 + seed)
    for _ in range(steps):
        ids = corpus.windows("train", batch, length + 1, g)
        loss = F.cross_entropy(teacher(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return teacher.eval()


def held_out_windows(corpus: CharCorpus, count: int = 64, length: int = 64) -> torch.Tensor:
    return corpus.windows("held_out", count, length + 1, torch.Generator().manual_seed(12345))


@torch.no_grad()
def perplexities(model, teacher, windows: torch.Tensor) -> tuple[float, float]:
    """(held-out perplexity on the true next characters, perplexity under the teacher's distribution)."""
    logits = model(windows[:, :-1]).float()
    true_ppl = math.exp(F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item())
    p_teacher = teacher(windows[:, :-1]).float().softmax(-1)
    cross = -(p_teacher * logits.log_softmax(-1)).sum(-1).mean().item()
    return true_ppl, math.exp(cross)


def train_student(corpus: CharCorpus, teacher, loss_name: str, steps: int, seed: int, length: int = 64,
                  batch: int = 32):
    student = tiny_causal_lm(corpus.vocab_size, layers=1, width=32, heads=2, max_length=length, seed=seed)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(2000 + seed)
    mask = torch.ones(batch, length)
    for _ in range(steps):
        ids = corpus.windows("train", batch, length + 1, g)
        logits = student(ids[:, :-1])
        if LOSSES[loss_name] is None:
            loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        else:
            with torch.no_grad():
                teacher_logits = teacher(ids[:, :-1])
            loss = token_distill_loss(logits, teacher_logits, mask, loss_name, **LOSSES[loss_name])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return student.eval()


def compare(seeds=(0, 1, 2), teacher_steps: int = 600, student_steps: int = 300, corpus: CharCorpus | None = None,
            losses=tuple(LOSSES), length: int = 64):
    """Train the teacher once and every (loss, seed) student; returns the teacher's perplexities,
    ``{loss: [(true_ppl, teacher_ppl) per seed]}`` and the vocabulary size."""
    corpus = corpus or load_char_corpus(lee_background_path())
    teacher = train_teacher(corpus, teacher_steps, length)
    windows = held_out_windows(corpus, length=length)
    results = {name: [perplexities(train_student(corpus, teacher, name, student_steps, seed, length), teacher,
                                   windows) for seed in seeds] for name in losses}
    return perplexities(teacher, teacher, windows), results, corpus.vocab_size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--student-steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    (t_true, t_self), results, vocab = compare(tuple(args.seeds), args.teacher_steps, args.student_steps)
    print(f"# LM distillation on gensim's lee_background.cor (characters, vocab {vocab} = uniform perplexity); "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, {time.perf_counter() - start:.0f} s")
    print(f"teacher 2x96, {args.teacher_steps} steps: held-out perplexity {t_true:.2f} (entropy floor under "
          f"itself {t_self:.2f}); student 1x32, {args.student_steps} steps, seeds {args.seeds}")
    print(f"{'loss':<12}{'ppl under teacher (mean [min, max])':>38}{'true held-out ppl (mean)':>28}"
          f"{'vs CE under teacher':>22}")
    ce_mean = statistics.mean(r[1] for r in results["ce"])
    for name, rows in results.items():
        under = [r[1] for r in rows]
        true = [r[0] for r in rows]
        print(f"{name:<12}{statistics.mean(under):>20.3f} [{min(under):.3f}, {max(under):.3f}]"
              f"{statistics.mean(true):>22.3f}{statistics.mean(under) - ce_mean:>+22.3f}")


if __name__ == "__main__":
    main()
