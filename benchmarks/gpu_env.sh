# Source on the lent GPU machine (see ../shared/docs/gpu.md): unpacks the prebuilt kernels and the
# CIFAR-10 archives that were carried in .gpu/ (k/: kernels, d/: data) and sets PYTHONPATH.
#   mkdir -p .gpu/k .gpu/d && cp ../shared/kernels/*-sm90-*.tar.xz .gpu/k/ && cp ../shared/data/cifar10/*.tar.xz .gpu/d/
#   (then on the device)  . benchmarks/gpu_env.sh
set -e
K=/tmp/rmeeto_kernels
mkdir -p "$K"
for f in .gpu/k/*.tar.xz; do [ -e "$f" ] && tar xJf "$f" -C "$K"; done
if ls .gpu/d/*.tar.xz >/dev/null 2>&1; then
  mkdir -p /tmp/cifar10 && for f in .gpu/d/*.tar.xz; do tar xJf "$f" -C /tmp/cifar10; done
fi
export PYTHONPATH="$K/mamba_ssm:$K/causal_conv1d:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
python3 - <<'PY'
import torch
print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__)
from compressor.ops import kernels_available
print("kernels:", kernels_available())
PY
set +e
