#!/usr/bin/env bash
# On a GPU machine: build the package (CUDA extension included), run the GPU tests, the benchmarks and
# a short fused training run, writing every log and JSON under $OUT (default ./out).
#
#   bash scripts/gpu_check.sh [STAGE ...]
#   STAGE: tests, ops, throughput, arrays, quality, tune, train, all (default: all but tune)
#
# Every stage builds first (incremental after the first call, ~30 s cold). One device call is limited
# to 10 minutes and a session's device time to ~15: the first call should be `tests throughput`
# (~6 min), the next `quality` (~4 min: decides backend auto), then `tune` (writes
# acai_fast/ops/tuned/sm90.json: copy it back from $OUT and commit it) and `ops train`.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
stages=${*:-all}
want() { [[ ( " $stages " == *" all "* && "$1" != tune ) || " $stages " == *" $1 "* ]]; }

nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt"
python -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -20 | tee "$OUT/build.log"
python -c "import acai_fast; print('cuda extension:', acai_fast.cuda_extension_available())" 2>&1 | tee -a "$OUT/build.log"

if want tests; then
  timeout 400 python -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log"
fi
if want ops; then
  for b in bench_conv_block bench_fused_ops; do
    timeout 300 python "bench/$b.py" --json "$OUT/$b.json" 2>&1 | tee "$OUT/$b.log"
  done
fi
if want throughput; then
  # ~2-3 min: lines and cifar1024 at batch 64 and 1024, every variant but torch.compile, >= 100 timed
  # steps each, cold/warm first step of the fused trainer (fresh processes), NVML during the timing.
  timeout 420 python bench/throughput.py --quick --first-step-timeout 120 --json "$OUT/throughput.json" \
    --csv "$OUT/throughput.csv" --plot "$OUT/throughput.png" 2>&1 | tee "$OUT/throughput.log"
  # ~1 min: where the fused lines step's time goes (eager launches, so the phases are visible).
  timeout 150 acai-fast profile --preset lines --batch 64 --backend fused --no-cuda-graph --steps 5 \
    --out "$OUT/profile_lines" 2>&1 | tee "$OUT/profile_lines.log"
fi
if want arrays; then
  # ~2 min: lines at 64 images per run, arrays of 1, 4 and 16 runs: fused array, K fused runs one after
  # another, torch.func vmap, HFTA's grouped convs, K plain bf16 CUDA-graph steps (bench/throughput.py --array).
  timeout 300 python bench/throughput.py --array 1,4,16 --presets lines --batches 64 --warmup 3 --steps 20 \
    --min-seconds 0.2 --array-max-seconds 1 --json "$OUT/arrays.json" --csv "$OUT/arrays.csv" \
    --plot "$OUT/arrays.png" 2>&1 | tee "$OUT/arrays.log"
fi
if want quality; then
  # Fused vs reference training quality on lines (2 seeds x 256 kimg each): the gate for backend auto.
  timeout 540 python scripts/compare_quality.py --kimg 256 --seeds 0,1 --json "$OUT/quality.json" \
    2>&1 | tee "$OUT/quality.log"
fi
if want tune; then
  # Autotune every conv kernel at the presets' shapes and write the shipped table (copied to $OUT).
  timeout 540 python bench/tune.py --presets lines,cifar1024 --batches 64,1024 2>&1 | tee "$OUT/tune.log"
  cp acai_fast/ops/tuned/sm*.json "$OUT/" 2>/dev/null
fi
if want train; then
  # The lines preset end to end on the fused backend (metrics, PNG, checkpoint under $OUT/lines).
  rm -rf "$OUT/lines"
  timeout 300 acai-fast train --preset lines --kimg 2048 --eval-kimg 512 --backend fused --cuda-graph \
    --device cuda --out "$OUT/lines" --no-progress 2>&1 | tee "$OUT/train_lines.log"
fi
