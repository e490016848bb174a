"""Must-show, short form: a tiny character teacher trained on a real corpus (gensim's Lee background news) is far
below uniform perplexity, and a smaller student distilled with forward KL beats the same student trained with
cross-entropy on the same windows in held-out perplexity under the teacher's distribution. The 3-seed table over
forward KL, reverse KL and JSD is bench/lm_perplexity.py's (numbers in its docstring and the README)."""
import os
import sys

import pytest
import torch

pytest.importorskip("gensim")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "bench"))
from lm_perplexity import compare  # noqa: E402


@pytest.mark.slow
def test_forward_kl_student_beats_ce_student_under_the_teacher():
    torch.set_num_threads(1)
    (teacher_ppl, _), results, vocab = compare(seeds=(0,), teacher_steps=150, student_steps=80,
                                               losses=("ce", "forward_kl"), length=32)
    assert teacher_ppl < 0.35 * vocab                     # 55 characters: uniform perplexity 55
    ce, fkl = results["ce"][0][1], results["forward_kl"][0][1]
    print(f"teacher held-out ppl {teacher_ppl:.2f} (uniform {vocab}); under the teacher: CE {ce:.3f}, "
          f"forward KL {fkl:.3f}")
    assert fkl < ce - 0.1
