"""Language-model distillation step throughput: tokens/s of a student step (CE), a teacher forward and a KD step
with the loss over the full vocabulary, chunked over the sequence, over the teacher's live top-k, and over a
cached top-k (no teacher at all). The KD steps' floor is the student step plus the teacher forward (the cached
step's floor is the student step alone); the ratio column is each step's time over that floor. Steps are timed
round-robin so that a shared machine's load hits all alike. Also reports the Parquet cache's bytes per token.

Tiny GPT-style models (:class:`kdray.models.causal_lm.TinyCausalLM`), random tokens: this measures the loss
machinery, not a model's quality.
Run: ``python bench/lm_step.py [--device cuda] [--threads 1] [--batch 4] [--length 64] [--vocab 4096] [--k 32]``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import header, time_interleaved  # noqa: E402

from kdray.algorithms.lm.chunked import chunked_token_distill_loss  # noqa: E402
from kdray.algorithms.lm.token_loss import token_distill_loss  # noqa: E402
from kdray.algorithms.lm.topk import TeacherTopK, teacher_topk, topk_distill_loss  # noqa: E402
from kdray.data.lm_topk_cache import bytes_per_token, read_lm_topk_parquet, write_lm_topk_parquet  # noqa: E402
from kdray.models.causal_lm import tiny_causal_lm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=16, help="positions per chunk of the chunked loss")
    parser.add_argument("--student", default="2x64", help="layers x width")
    parser.add_argument("--teacher", default="4x128", help="layers x width")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--divergence", default="forward_kl")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    (s_layers, s_width), (t_layers, t_width) = (map(int, spec.split("x")) for spec in (args.student, args.teacher))
    student = tiny_causal_lm(args.vocab, s_layers, s_width, 4, args.length, seed=1).to(device)
    teacher = tiny_causal_lm(args.vocab, t_layers, t_width, 4, args.length, seed=2).to(device).eval()
    opt = torch.optim.SGD(student.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.length), generator=g).to(device)
    mask = torch.ones(args.batch, args.length - 1, device=device)
    tokens = args.batch * (args.length - 1)

    with tempfile.TemporaryDirectory() as tmp:
        with torch.no_grad():
            topk = teacher_topk(teacher(ids), args.k, value_dtype=torch.float16)
        path = write_lm_topk_parquet(os.path.join(tmp, "topk.parquet"), topk.indices.cpu(), topk.logprobs.cpu(),
                                     temperature=1.0, vocab_size=args.vocab, fingerprint="bench")
        cache_bytes = bytes_per_token(path)
        cache = read_lm_topk_parquet(path)
    cached = TeacherTopK(cache.indices.to(device)[:, :-1], cache.logprobs.to(device)[:, :-1], 1.0, args.vocab)

    def update(loss):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def student_step():
        logits = student(ids)[:, :-1]
        update(F.cross_entropy(logits.reshape(-1, args.vocab).float(), ids[:, 1:].reshape(-1)))

    def teacher_forward():
        with torch.no_grad():
            return teacher(ids)

    def kd_full():
        update(token_distill_loss(student(ids)[:, :-1], teacher_forward()[:, :-1], mask, args.divergence))

    def kd_chunked():
        with torch.no_grad():
            hidden_t = teacher.hidden_states(ids)[:, :-1]
        hidden_s = student.hidden_states(ids)[:, :-1]
        update(chunked_token_distill_loss(hidden_s, hidden_t, mask, args.divergence, chunk_size=args.chunk,
                                          student_head=student.lm_head, teacher_head=teacher.lm_head))

    def kd_topk():
        with torch.no_grad():
            live = teacher_topk(teacher(ids)[:, :-1], args.k)
        update(topk_distill_loss(student(ids)[:, :-1], live, mask, args.divergence))

    def kd_cached_topk():
        update(topk_distill_loss(student(ids)[:, :-1], cached, mask, args.divergence))

    fns = {"student step (CE)": student_step, "teacher forward": teacher_forward, "KD full vocab": kd_full,
           f"KD chunked ({args.chunk} pos)": kd_chunked, f"KD top-{args.k} live": kd_topk,
           f"KD top-{args.k} cached": kd_cached_topk}
    seconds = time_interleaved(fns, device, warmup=2, repeats=args.repeats)
    floor = seconds["student step (CE)"] + seconds["teacher forward"]
    print(header("LM distillation step: tokens/s"))
    print(f"batch {args.batch} x length {args.length} ({tokens} predicted tokens), vocab {args.vocab}, student "
          f"{args.student}, teacher {args.teacher} (layers x width), divergence {args.divergence}, device {device}")
    print(f"{'step':<24}{'ms':>10}{'tokens/s':>12}{'x floor':>10}")
    for name, s in seconds.items():
        ratio = ""
        if name.startswith("KD"):
            base = seconds["student step (CE)"] if "cached" in name else floor
            ratio = f"{s / base:.2f}"
        print(f"{name:<24}{s * 1e3:>10.1f}{tokens / s:>12.0f}{ratio:>10}")
    print(f"floor (student step + teacher forward): {floor * 1e3:.1f} ms; cached top-{args.k}'s floor is the "
          f"student step")
    print(f"top-{args.k} cache: {cache_bytes:.1f} bytes/token on disk (raw payload {6 * args.k}; full fp16 "
          f"logits would be {2 * args.vocab})")


if __name__ == "__main__":
    main()
