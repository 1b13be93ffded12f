#!/usr/bin/env bash
# VideoMamba video models on the lent GPU: the GPU tests at video lengths (Triton merge at 1569
# tokens, a whole video model in one CUDA graph), then benchmarks/video_gpu.py (correctness checks,
# largest batch, speed table; plain re-measured in the same run).
#   . benchmarks/gpu_env.sh > /tmp/env.log 2>&1   # kernels on PYTHONPATH (.gpu/k/*.tar.xz carried)
#   RES=runs/video bash benchmarks/video_gpu.sh [--max-batch N ...]
set -uo pipefail
RES=${RES:-runs/video}
mkdir -p "$RES"
python3 -m pytest -q -p no:cacheprovider tests/test_video_gpu.py 2>&1 | tee "$RES/tests.log" | tail -4
python3 benchmarks/video_gpu.py --out "$RES/video_gpu.json" "$@" 2>&1 | tee "$RES/bench.log"
