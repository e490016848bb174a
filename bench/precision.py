"""Per-step time of a KD step by precision, memory format and compilation: ``TrainLoop.step`` as training runs it.

Variants (each its own freshly seeded teacher -> student pair and loop, measured round-robin against fp32 in
the same run, so load that comes and goes on a shared machine hits all alike):

* ``fp32``: the baseline (the loop's defaults);
* ``bf16``: teacher forward and student step under bf16 autocast, terms in fp32;
* ``fp16``: the same with fp16 and a GradScaler (``--fp16``; CPU fp16 kernels are slow, so off by default there);
* ``channels_last``: models and 4-D inputs in ``torch.channels_last``, fp32;
* ``compile``: ``torch.compile`` student and teacher, fp32; its first step (the compilation) is printed apart
  from the steady-state step time.

On a CPU, bf16 is a *correctness* check (does the bf16 path run and give the fp32 loss within tolerance?), not
a speed claim: CPUs without AMX / AVX512-BF16 emulate it and are slower than fp32. Speed claims need ``--device
cuda``. The loss each variant computes on its first step is printed beside the fp32 one.
Run: ``python bench/precision.py [--device cuda] [--batch 64] [--teacher resnet56 --student resnet20]``.
"""
from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import header, step_parser, sync, time_interleaved  # noqa: E402

from kdray.algorithms import create_method  # noqa: E402
from kdray.algorithms.base import Batch  # noqa: E402
from kdray.algorithms.distiller import Distiller, Teacher  # noqa: E402
from kdray.algorithms.engine import TrainLoop, seed_everything  # noqa: E402
from kdray.algorithms.optim import make_optimizer, make_schedule  # noqa: E402
from kdray.algorithms.precision import channels_last_input  # noqa: E402
from kdray.models import create_model  # noqa: E402

VARIANTS = {"fp32": {}, "bf16": {"precision": "bf16"}, "fp16": {"precision": "fp16"},
            "channels_last": {"channels_last": True}, "compile": {"compile": True}}


def make_loop(args, device, hardware: dict) -> TrainLoop:
    seed_everything(0)
    student = create_model(args.student, 100)
    teacher_model = create_model(args.teacher, 100)
    distiller = Distiller(student, [create_method(args.method)])
    teacher = Teacher(teacher_model, distiller.resolve_teacher_points(teacher_model))
    distiller.build(torch.randn(2, 3, 32, 32), teacher, 50_000)
    distiller.to(device)
    teacher.to(device)
    opt = make_optimizer(distiller.parameters(), "sgd", 0.05, 5e-4, 0.9)
    return TrainLoop(distiller, teacher, opt, make_schedule(opt, "constant", 1), [], [], 100, 1, device,
                     **hardware)


def main() -> None:
    parser = step_parser()
    parser.add_argument("--method", default="kd", help="knowledge term of the step (any `kdray list methods`)")
    parser.add_argument("--fp16", action="store_true", help="also time fp16 + GradScaler (default on cuda)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    args = parser.parse_args()
    device = torch.device(args.device)
    names = [n for n in VARIANTS if (n != "fp16" or args.fp16 or device.type == "cuda")
             and (n != "compile" or not args.no_compile)]
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 100, (args.batch,), device=device)
    idx = torch.arange(args.batch, device=device)

    loops, first_loss, first_step_s, steps = {}, {}, {}, {}
    for name in names:
        loop = loops[name] = make_loop(args, device, VARIANTS[name])
        batch = Batch(channels_last_input(x) if loop.channels_last else x, y, idx)
        sync(device)
        start = time.perf_counter()
        loss, _ = loop.step(batch)  # compile: this is where compilation happens
        sync(device)
        first_step_s[name] = time.perf_counter() - start
        first_loss[name] = float(loss.detach())
        steps[name] = (lambda lp=loop, b=batch: lp.step(b))
    t = time_interleaved(steps, device, repeats=args.repeats)

    print(header(f"KD step by precision / memory format / compile: {args.teacher} -> {args.student}, "
                 f"{args.method}, batch {args.batch}, {device}"))
    print("| variant | ms / step | images / s | ratio vs fp32 (time) | first step s | first-step loss |")
    print("|---|---|---|---|---|---|")
    for name in names:
        print(f"| {name} | {t[name] * 1e3:.1f} | {args.batch / t[name]:.0f} | {t[name] / t['fp32']:.3f} | "
              f"{first_step_s[name]:.2f} | {first_loss[name]:.4f} |")
    print("\nratio < 1: faster than fp32. first-step loss: the same weights and batch in every variant; bf16 / fp16 "
          "differ from fp32 by rounding of the networks' activations (the terms compute in fp32).")
    if device.type == "cpu":
        print("bf16 (and fp16) on a CPU is a correctness check, not a speed claim: without AMX / AVX512-BF16 the "
              "low-precision kernels are emulated and slower than fp32; measure speed with --device cuda.")
    if "compile" in names:
        print(f"compile: the first step took {first_step_s['compile']:.1f} s against {first_step_s['fp32']:.2f} s "
              f"eager (inductor's on-disk cache makes later runs of the same models start faster); one more "
              f"compilation follows when the batch shape or train/eval mode changes.")


if __name__ == "__main__":
    main()
