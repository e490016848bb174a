"""Size on disk and CPU latency of low-bit exports (kdray/algorithms/quantize.py) against the fp32 model.

For each model (random weights: size and latency do not depend on training) and each bit width, the model is
fake-quantised the way the ``quantized`` scheme does it (weights per output channel, the quantised layers'
inputs per batch, first and last layer fp32 unless ``--all-layers``), exported (packed codes + scales, written
with ``torch.save``) and rebuilt by ``load_quantized``. Printed per row: the file's bytes and the tensors'
bytes (without torch.save's per-tensor container overhead), both against the fp32 state dict's, and the median
batch-of-``--batch`` forward of the rebuilt model against the fp32 model's, measured round-robin in the same
run. The rebuilt model is *dequantised* execution (fp32 kernels on decoded weights, inputs fake-quantised per
batch): expect it slower than fp32, not faster; integer kernels are not used (CPU engines run int8 at best).
Run: ``python bench/quantized_export.py [--models digits_mlp resnet20] [--bits 2 3 4 8] [--all-layers]``.
"""
from __future__ import annotations

import argparse
import io
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import header, time_interleaved  # noqa: E402

from kdray.algorithms.quantize import (export_quantized, load_quantized, payload_bytes, quantize_model_,  # noqa: E402
                                       saved_bytes)
from kdray.models import create_model  # noqa: E402

MODELS = {"digits_mlp": ({"hidden": 32, "depth": 2}, 10, (1, 8, 8)),
          "digits_cnn": ({"width": 16}, 10, (1, 8, 8)),
          "resnet20": ({}, 100, (3, 32, 32))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["digits_mlp", "digits_cnn", "resnet20"], choices=list(MODELS))
    parser.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4, 8])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--all-layers", action="store_true", help="quantise the first and last layer too")
    args = parser.parse_args()
    print(header("kdray low-bit exports vs fp32 (bench/quantized_export.py)"))
    print(f"weights per channel, first/last layer {'quantised' if args.all_layers else 'fp32'}; latency: median of "
          f"{args.repeats} batch-of-{args.batch} CPU forwards, dequantised execution\n")
    print("| model | bits | file bytes | fp32 file bytes | file ratio | tensor bytes | fp32 tensor bytes | tensor "
          "ratio | latency ms | fp32 latency ms | latency ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        knobs, classes, shape = MODELS[name]
        torch.manual_seed(0)
        fp32 = create_model(name, classes, **knobs).eval()
        inputs = torch.rand(args.batch, *shape)
        fp32_state = fp32.state_dict()
        for bits in args.bits:
            student = create_model(name, classes, **knobs)
            student.load_state_dict(fp32_state)
            quantize_model_(student, bits, quantize_first_last=args.all_layers)
            export = export_quantized(student, {"model": name})
            buffer = io.BytesIO()
            torch.save(export, buffer)
            buffer.seek(0)
            rebuilt = load_quantized(create_model(name, classes, **knobs),
                                     torch.load(buffer, weights_only=True)).eval()
            with torch.no_grad():
                times = time_interleaved({"fp32": lambda: fp32(inputs), "low": lambda: rebuilt(inputs)}, "cpu",
                                         repeats=args.repeats)
            file_bytes, fp32_file = buffer.getbuffer().nbytes, saved_bytes(fp32_state)
            tensor_bytes = payload_bytes({"q": export["quantized"], "t": export["tensors"]})
            fp32_tensor = payload_bytes(dict(fp32_state))
            print(f"| {name} | {bits} | {file_bytes} | {fp32_file} | {fp32_file / file_bytes:.2f}x | {tensor_bytes} | "
                  f"{fp32_tensor} | {fp32_tensor / tensor_bytes:.2f}x | {times['low'] * 1e3:.3f} | "
                  f"{times['fp32'] * 1e3:.3f} | {times['low'] / times['fp32']:.2f} |")


if __name__ == "__main__":
    main()
