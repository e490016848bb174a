#!/usr/bin/env bash
# One command for a CUDA machine: the step, precision, cache and epoch benchmarks on the device in fp32 and
# bf16 (+ torch.compile), then a 3-epoch CRD-protocol smoke run (resnet32x4 -> resnet8x4 KD on
# CIFAR-100-shaped data) printing images/s and the projected time of the 240-epoch run.
#
#   bash bench/gpu.sh                    # on the GPU, full sizes
#   bash bench/gpu.sh --device cpu --tiny  # CI-sized, on a CPU (tests/test_bench_gpu.py runs this: it cannot rot)
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
TINY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --tiny) TINY=1; shift ;;
    *) echo "bench/gpu.sh: unknown option $1 (use --device cpu|cuda, --tiny)" >&2; exit 2 ;;
  esac
done
if [ "$TINY" = 1 ]; then
  STEP=(--batch 8 --repeats 1 --teacher resnet8 --student resnet8); CACHE=(--samples 2000 --views 2 "${STEP[@]}")
  EPOCH=(--images 128 --batch 32 --repeats 1 --teacher resnet8 --student resnet8); SMOKE=(--epochs 1 --images 16 --workers 0)
  COMPILE=(--no-compile)
else
  STEP=(--batch 64 --repeats 20); CACHE=(); EPOCH=(--images 20000 --batch 64 --repeats 3); SMOKE=(--epochs 3)
  COMPILE=()
fi
echo "== bench/gpu.sh on $DEVICE ($(date -u +%FT%TZ))"
python bench/step.py --device "$DEVICE" "${STEP[@]}"
python bench/precision.py --device "$DEVICE" "${STEP[@]}" "${COMPILE[@]}"
python bench/cache.py "${CACHE[@]}"
python bench/epoch.py --device "$DEVICE" "${EPOCH[@]}"
for PRECISION in fp32 bf16; do
  python bench/crd_protocol.py --device "$DEVICE" --precision "$PRECISION" "${SMOKE[@]}"
done
if [ "$TINY" = 0 ]; then
  python bench/crd_protocol.py --device "$DEVICE" --precision bf16 --compile --channels-last "${SMOKE[@]}"
fi
echo "== bench/gpu.sh done"
