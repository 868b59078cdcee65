#!/usr/bin/env bash
# One call on a GPU machine: build the package (CUDA extension included), run the GPU tests, then the
# benchmarks, writing every log and JSON under $OUT (default ./out). Usage: bash scripts/gpu_check.sh
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt"
python -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -20 | tee "$OUT/build.log"
python -c "import acai_fast; print('cuda extension:', acai_fast.cuda_extension_available())" 2>&1 | tee -a "$OUT/build.log"
python -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log"
for b in bench/bench_conv_block.py bench/bench_fused_ops.py; do
  name=$(basename "$b" .py)
  [ -f "$b" ] && timeout 300 python "$b" --json "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log"
done
timeout 400 python bench/throughput.py --presets lines,cifar1024 --batches 64,1024 \
  --json "$OUT/throughput.json" 2>&1 | tee "$OUT/throughput.log"
