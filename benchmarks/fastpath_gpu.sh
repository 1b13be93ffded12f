#!/usr/bin/env bash
# Inference fast path on the lent GPU: the GPU tests of the Triton merge and of CUDA-graph capture,
# then the speed table (Vim-Ti/S/B, random weights, fp16, batch 128 and 1, eager and one CUDA graph)
# with the Triton merge, and the reference (torch) merge at r031 for comparison; the baseline is
# re-measured in every invocation.
#   . benchmarks/gpu_env.sh > /tmp/env.log 2>&1   # kernels on PYTHONPATH
#   RES=runs/fastpath bash benchmarks/fastpath_gpu.sh [quick|full]
set -uo pipefail
RES=${RES:-runs/fastpath}; MODE=${1:-full}
mkdir -p "$RES"
python3 -m pytest -q tests/test_merge_fast_gpu.py tests/test_merge_fast.py 2>&1 | tee "$RES/tests.log" | tail -4
if [ "$MODE" = quick ]; then
  MODELS=vim_small; RECIPES=none,r031
else
  MODELS=vim_tiny,vim_small,vim_base; RECIPES=none,r014,r031,r042,r056
fi
python3 benchmarks/profile_merge_kernels.py --model vim_small --recipe r031 --batch-sizes 1,128 2>&1 | tee "$RES/kernels.log"
python3 benchmarks/bench_profile_gpu.py --models $MODELS --recipes $RECIPES --batch-sizes 128,1 \
  --merge-impl triton --out "$RES/fastpath_triton.json" 2>&1 | tee "$RES/bench_triton.log"
python3 benchmarks/bench_profile_gpu.py --models $MODELS --recipes none,r031 --batch-sizes 128,1 \
  --merge-impl torch --out "$RES/fastpath_torch.json" 2>&1 | tee "$RES/bench_torch.log"
