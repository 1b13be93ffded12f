"""A stand-in for a kernel package (like mamba-ssm's Triton ``rms_norm_fn``): functions the
foreign test models call as functions, which torch.fx's symbolic tracing cannot enter (they
branch on their inputs' dtype, as a kernel launcher checks its inputs), while torch.export can."""

import torch


def fused_add_rms_norm(x, weight, residual=None, eps=1e-5, prenorm=True):
    """``residual + x`` (fp32) then RMSNorm; returns ``(normed, residual)`` or ``normed``."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):  # a Proxy stops fx here
        raise TypeError(f"unsupported dtype {x.dtype}")
    acc = torch.promote_types(x.dtype, torch.float32)
    residual = x.to(acc) if residual is None else residual.to(acc) + x.to(acc)
    normed = (residual * torch.rsqrt(residual.pow(2).mean(-1, keepdim=True) + eps) * weight.to(acc)).to(weight.dtype)
    return (normed, residual) if prenorm else normed
