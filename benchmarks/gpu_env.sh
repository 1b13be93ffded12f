# Source on a GPU machine without network: unpacks prebuilt kernel trees (mamba_ssm/ and
# causal_conv1d/ built for the card, as .tar.xz) and the CIFAR-10 archives (train.tar.xz,
# test.tar.xz: JPEGs in ImageFolder layout) found in .gpu/ (k/: kernels, d/: data) or .gpu2/
# (mamba-ssm + data in one folder), and sets PYTHONPATH.
#   mkdir -p .gpu/k .gpu/d && cp /path/to/kernels/*-sm90-*.tar.xz .gpu/k/ && cp /path/to/cifar10/*.tar.xz .gpu/d/
#   (then on the device)  . benchmarks/gpu_env.sh
K=/tmp/rmeeto_kernels
mkdir -p "$K"
for f in .gpu/k/*.tar.xz .gpu2/mamba*.tar.xz; do [ -e "$f" ] && tar xJf "$f" -C "$K"; done
if compgen -G ".gpu/d/*.tar.xz" >/dev/null || compgen -G ".gpu2/t*.tar.xz" >/dev/null; then
  mkdir -p /tmp/cifar10 && for f in .gpu/d/*.tar.xz .gpu2/t*.tar.xz; do [ -e "$f" ] && tar xJf "$f" -C /tmp/cifar10; done
fi
export PYTHONPATH="$K/mamba_ssm:$K/causal_conv1d:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
python3 - <<'PY'
import torch
print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__)
from compressor.ops import kernels_available
print("kernels:", kernels_available())
PY
