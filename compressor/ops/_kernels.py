"""The only place that imports the optional CUDA kernel packages (mamba-ssm, causal-conv1d)."""

from __future__ import annotations

import functools

INSTALL_HINT = (
    "install the CUDA kernels with `pip install 'rmeeto[cuda]'` (mamba-ssm and causal-conv1d, "
    "built for your torch and GPU) or choose backend 'chunked' or 'ref'"
)


ERRORS: dict[str, str] = {}  # why an entry point did not import (shown by `rmeeto info`, benchmarks)


@functools.lru_cache(maxsize=None)
def load(name: str):
    """Import one kernel entry point; ``None`` when its package is missing or broken."""
    if name != "selective_scan_fn":
        # import mamba-ssm first: its own optional import of causal_conv1d must not see a
        # half-initialised causal_conv1d left behind by a failed import of ours
        load("selective_scan_fn")
    try:
        if name == "selective_scan_fn":
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

            return selective_scan_fn
        if name == "causal_conv1d_fn":
            from causal_conv1d import causal_conv1d_fn

            return causal_conv1d_fn
        if name == "rms_norm_fn":
            from mamba_ssm.ops.triton.layer_norm import rms_norm_fn

            return rms_norm_fn
    except Exception as e:  # a half-installed kernel package raises all sorts; treat as absent
        ERRORS[name] = f"{type(e).__name__}: {e}"
        return None
    raise KeyError(name)


def available() -> dict[str, bool]:
    """Which kernel entry points import on this machine."""
    return {n: load(n) is not None for n in ("selective_scan_fn", "causal_conv1d_fn", "rms_norm_fn")}
