#!/usr/bin/env bash
# ONNX Runtime's CUDA execution provider on the lent GPU (docs/benchmarks.md, "ONNX Runtime on
# the GPU"). The GPU host has no network and only the CPU onnxruntime: the onnxruntime-gpu wheel
# (a CUDA 13 build, 256 MB) arrives in pieces, together with the prebuilt mamba-ssm /
# causal-conv1d tarballs (for PyTorch's own fast path beside it), all in one folder:
#
#   bash benchmarks/onnx_gpu.sh PIECES_DIR OUT_DIR
#
# PIECES_DIR: onnxruntime_gpu-*.whl.part0..N (split -b 52M -d -a 1) + the wheel's .sha256, and
# optionally mamba_ssm-*.tar.xz / causal_conv1d-*.tar.xz. The wheel is joined, checked, installed
# with `pip install --no-deps --target /tmp/ortgpu` and put first on PYTHONPATH (ahead of the
# image's CPU onnxruntime); onnxruntime.preload_dlls() (compressor.export._runtime) then finds
# the CUDA 13 / cuDNN 9 libraries of PyTorch's nvidia-* packages.
set -uo pipefail
PIECES=${1:?pieces folder}; OUT=${2:-${OUT:-runs/onnx_gpu}}
mkdir -p "$OUT"
part0=$(ls "$PIECES"/*.whl.part0 2>/dev/null | head -1)
[ -n "$part0" ] || { echo "no *.whl.part0 in $PIECES" | tee "$OUT/onnx_gpu.log"; exit 1; }
wheel=$(basename "${part0%.part0}")
cat "$PIECES/$wheel".part* > "/tmp/$wheel"
if [ -f "$PIECES/$wheel.sha256" ]; then
  (cd /tmp && sha256sum -c "$PIECES/$wheel.sha256") 2>&1 | tee "$OUT/onnx_gpu.log" || exit 1
fi
python3 -m pip install -q --no-deps --no-compile --target /tmp/ortgpu "/tmp/$wheel" 2>&1 | tail -3 | tee -a "$OUT/onnx_gpu.log" || exit 1
K=/tmp/rmeeto_kernels; mkdir -p "$K"
for f in "$PIECES"/mamba_ssm-*.tar.xz "$PIECES"/causal_conv1d-*.tar.xz; do [ -e "$f" ] && tar xJf "$f" -C "$K"; done
export PYTHONPATH="/tmp/ortgpu:$K/mamba_ssm:$K/causal_conv1d:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$OUT/onnx_gpu.log"
python3 -c "import torch; from compressor.ops import kernels_available; print('torch', torch.__version__, torch.cuda.get_device_name(0), 'kernels', kernels_available())" 2>&1 | tee -a "$OUT/onnx_gpu.log"
python3 benchmarks/onnx_gpu.py --out "$OUT/onnx_gpu_h200.json" "${@:3}" 2>&1 | grep -v "always_classified" | tee -a "$OUT/onnx_gpu.log"
