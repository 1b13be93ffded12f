#!/usr/bin/env bash
# rmeeto's Triton mixer kernels on the lent GPU: the GPU tests (triton vs the float64 reference
# and vs the mamba-ssm kernels, forward and gradients, fp32/fp16/bf16), then the timings of
# benchmarks/triton_mixer_gpu.py (the cuda baseline re-measured in the same run).
#   mkdir -p .gpu/k && cp KERNELS/*-sm90-*.tar.xz .gpu/k/     # prebuilt mamba-ssm / causal-conv1d trees (see benchmarks/gpu_env.sh)
#   OUT=runs/triton bash benchmarks/triton_mixer_gpu.sh [all|tests|bench] [triton_mixer_gpu.py options]
set -uo pipefail
OUT=${OUT:-runs/triton}; MODE=${1:-all}; shift || true
mkdir -p "$OUT"
. benchmarks/gpu_env.sh > "$OUT/env.log" 2>&1; cat "$OUT/env.log"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv,noheader || true
if [ "$MODE" = all ] || [ "$MODE" = tests ]; then
  start=$(date +%s)
  ERR=$(mktemp -d)
  RMEETO_ERRORS_JSON="$ERR/errors.json" ${TESTS_TIMEOUT:+timeout $TESTS_TIMEOUT} python3 -m pytest -q -p no:cacheprovider \
    -m gpu -n 8 --dist loadgroup tests/test_ops_triton_gpu.py 2>&1 | tee "$OUT/tests.log" | tail -25
  python3 -c "import glob, json, sys; json.dump([r for f in sorted(glob.glob(sys.argv[1] + '/*.json')) for r in json.load(open(f))], open(sys.argv[2], 'w'), indent=0)" "$ERR" "$OUT/errors.json"
  echo "tests took $(( $(date +%s) - start )) s"
fi
if [ "$MODE" = all ] || [ "$MODE" = bench ]; then
  ${BENCH_TIMEOUT:+timeout $BENCH_TIMEOUT} python3 benchmarks/triton_mixer_gpu.py --out "$OUT/triton_mixer.json" "$@" 2>&1 | tee "$OUT/bench.log"
fi
