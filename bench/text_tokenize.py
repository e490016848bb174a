"""Tokenising a text corpus in-process vs with Ray Data (``data.options.tokenize_with: ray``), in the same run.

The corpus: gensim's Lee news sentences (shipped in gensim's wheel) repeated ``--repeat`` times into one JSONL
file. Timed, each as the builder sees it: ``process`` = ``text_files`` reading and tokenising the file (what
every builder of a job pays: the driver's preflight, each worker, task and check); ``ray cold`` / ``ray warm`` =
``tokenize_on_ray`` writing the Parquet file, the first time (Ray's worker processes import torch and
transformers) and again; ``read`` = ``text_files`` reading that file back. Printed: the ratios against
``process``, and the cost of ``--builders`` builds each way (in-process: builders x process; Ray: one warm
tokenisation + builders x read). Ray start-up is printed apart (a job on Ray has paid it already).

Run: ``OMP_NUM_THREADS=1 python bench/text_tokenize.py [--repeat 40 --concurrency 2 --builders 3]``.

Measured 2026-12-04 on the project's shared 2-core CPU box (torch 2.14.1, ray 2.60.0, transformers 5.25.0,
all-MiniLM-L6-v2's tokenizer, 104,440 sentences, max_length 128, 2 Ray Data tasks; two runs, the second here):

| path | seconds | rows/s | vs process |
|---|---|---|---|
| process (read + tokenise + tensors) | 33.1 | 3,159 | 1.00x |
| ray cold (tokenise, write Parquet) | 26.1 | 3,998 | 0.79x |
| ray warm | 12.3 | 8,464 | 0.37x |
| read the Parquet back | 2.1 | 50,494 | 0.06x |

3 builds: 99.2 s in-process vs 18.5 s with Ray warm (0.19x), 32.3 s cold (0.33x); ``ray.init`` 23.1 s apart
(first run: process 43.3 s, ray cold 35.9 s, warm 18.4 s, read 4.3 s; the box is shared, so both runs are
noisy). Part of the gain is not parallelism: the read-back builds each row's tensors from one flat array,
where the in-process path makes three tensors per row from Python lists.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import header  # noqa: E402
from kdray.data.text import lee_background_texts, text_files  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--builders", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from kdray.orchestrator.text_tokens import tokenize_on_ray

    print(header("text tokenisation: in-process vs Ray Data"))
    sentences = lee_background_texts() * args.repeat
    with tempfile.TemporaryDirectory() as folder:
        corpus = os.path.join(folder, "lee.jsonl")
        with open(corpus, "w") as f:
            f.writelines(json.dumps({"text": s}) + "\n" for s in sentences)
        opts = dict(path=corpus, tokenizer="all_minilm_l6_v2", task="embedding", max_length=args.max_length)
        splits, t_process = timed(lambda: text_files(**opts))
        _, t_init = timed(lambda: ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1),
                                           object_store_memory=256 * 2**20, include_dashboard=False,
                                           log_to_driver=False))
        run = lambda name: tokenize_on_ray(corpus, os.path.join(folder, name), tokenizer="all_minilm_l6_v2",  # noqa: E731
                                           max_length=args.max_length, label_column=None,
                                           concurrency=args.concurrency)
        _, t_cold = timed(lambda: run("cold.parquet"))
        out, t_warm = timed(lambda: run("warm.parquet"))
        again, t_read = timed(lambda: text_files(tokenized=str(out), **opts))
        assert again.fingerprint == splits.fingerprint
        ray.shutdown()
    rows = len(sentences)
    print(f"corpus: {rows} sentences ({args.repeat} x Lee), max_length {args.max_length}, "
          f"Ray Data concurrency {args.concurrency}; ray.init {t_init:.1f} s (apart)")
    for name, t in (("process", t_process), ("ray cold", t_cold), ("ray warm", t_warm), ("read", t_read)):
        print(f"{name:9s} {t:7.2f} s  {rows / t:9.0f} rows/s  {t / t_process:5.2f}x process")
    k = args.builders
    print(f"{k} builds: in-process {k * t_process:.1f} s; Ray {t_warm + k * t_read:.1f} s warm "
          f"({(t_warm + k * t_read) / (k * t_process):.2f}x), {t_cold + k * t_read:.1f} s cold "
          f"({(t_cold + k * t_read) / (k * t_process):.2f}x)")


if __name__ == "__main__":
    main()
