"""Cost of a KD step against its parts: resnet56 -> resnet20 on CIFAR-shaped batches of 64.

Prints images/s of (a) a plain student step (forward + backward + SGD), (b) a teacher forward
(eval, no_grad), (c) a KD step (teacher forward + student step + KD loss), and the ratio
KD / (student step + teacher forward), whose floor is 1.0: above it is the overhead of the
distillation machinery itself. Run: ``python bench/step.py [--device cuda] [--batch 64]``.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import header, step_parser, time_interleaved  # noqa: E402

from kdray.algorithms import create_method  # noqa: E402
from kdray.algorithms.base import Batch  # noqa: E402
from kdray.algorithms.distiller import Distiller, Teacher  # noqa: E402
from kdray.models import create_model  # noqa: E402


def main() -> None:
    parser = step_parser()
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 100, (args.batch,), device=device)
    batch = Batch(x, y, torch.arange(args.batch, device=device))

    plain = Distiller(create_model(args.student, 100)).to(device)
    kd = Distiller(create_model(args.student, 100), [create_method("kd", alpha=0.9, temperature=4.0)]).to(device)
    teacher = Teacher(create_model(args.teacher, 100)).to(device)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)
    opt_kd = torch.optim.SGD(kd.parameters(), lr=0.05, momentum=0.9)

    def student_step():
        _, losses = plain(batch)
        opt_plain.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt_plain.step()

    def teacher_forward():
        teacher(x)

    def kd_step():
        _, losses = kd(batch, teacher(x))
        opt_kd.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt_kd.step()

    t = time_interleaved({"student": student_step, "teacher": teacher_forward, "kd": kd_step}, device,
                         repeats=args.repeats)
    t_student, t_teacher, t_kd = t["student"], t["teacher"], t["kd"]
    print(header(f"KD step cost: {args.teacher} -> {args.student}, batch {args.batch}, {device}"))
    print("| measurement | ms / step | images / s |\n|---|---|---|")
    for name, t in [("student step (plain CE)", t_student), ("teacher forward (eval, no_grad)", t_teacher),
                    ("KD step (teacher fwd + student step)", t_kd)]:
        print(f"| {name} | {t * 1e3:.1f} | {args.batch / t:.0f} |")
    print(f"\nratio KD / (student step + teacher forward) = {t_kd / (t_student + t_teacher):.3f}  (floor 1.0)")


if __name__ == "__main__":
    main()
