"""CUDA kernels (mamba-ssm, causal-conv1d, the fused add+RMSNorm) against the pure-PyTorch
reference at Vim-S shapes. fp32: tight relative tolerances. fp16/bf16: the relative budget
``err(kernel_lowp, ref_fp64) <= 2 * err(ref_lowp, ref_fp64) + eps`` on the same (rounded) inputs.

Run on a GPU machine with the kernels on PYTHONPATH (benchmarks/gpu_env.sh):
``PYTHONPATH=/tmp/k/mamba_ssm:/tmp/k/causal_conv1d:$PWD python -m pytest -m gpu tests/test_ops_gpu.py``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from compressor import ops
from compressor.models import create_model, set_backend
from compressor.ops import (
    add_rms_norm,
    causal_conv1d,
    causal_conv1d_ref,
    kernels_available,
    selective_scan,
    selective_scan_ref,
)
from helpers import lively

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

F64 = torch.float64
LOWP = [torch.float16, torch.bfloat16]
# Vim-S: D = 384, d_inner = 768, 197 tokens, d_state 16
B_, D_, L_, N_ = 4, 768, 197, 16
SCAN_GRADS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
FP32_FLOOR = 1e-5  # eps of the low-precision budget, relative to the fp64 answer's magnitude


def require(*names: str) -> None:
    avail = kernels_available()
    missing = [n for n in names if not avail[n]]
    if missing:
        pytest.skip(f"kernels do not import here: {', '.join(missing)} (see benchmarks/gpu_env.sh)")


@pytest.fixture(autouse=True)
def _no_tf32():
    """Keep fp32 convs and matmuls in true fp32, so fp32 means fp32 on both sides."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs difference relative to the reference's max magnitude."""
    a, ref = a.double(), ref.double()
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def assert_budget(fast, ref_lowp, ref64, what, factor=2.0):
    """``err(fast, ref64) <= factor * err(ref_lowp, ref64) + eps`` (max-abs errors)."""
    scale = ref64.abs().max().item()
    err_fast = (fast.double() - ref64).abs().max().item()
    err_ref = (ref_lowp.double() - ref64).abs().max().item()
    assert math.isfinite(err_fast), what
    assert err_fast <= factor * err_ref + FP32_FLOOR * scale, f"{what}: kernel err {err_fast:.3g} vs reference err {err_ref:.3g} (scale {scale:.3g})"


# --------------------------------------------------------------------------- selective scan


def scan_inputs(seed=0):
    """fp64 inputs distributed like a Vim-S layer's: log-uniform Δ in [1e-3, 0.1] through
    bias + softplus, S4D-real A = -(1..16), gate z and skip D."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, device="cuda", dtype=F64)

    dt = torch.exp(torch.rand(D_, generator=g, device="cuda", dtype=F64) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return dict(
        u=r(B_, D_, L_),
        delta=r(B_, D_, L_) * 0.5,
        A=-torch.arange(1, N_ + 1, device="cuda", dtype=F64).repeat(D_, 1),
        B=r(B_, N_, L_),
        C=r(B_, N_, L_),
        D=r(D_),
        z=r(B_, D_, L_),
        delta_bias=dt + torch.log(-torch.expm1(-dt)),
    )


def cast_scan(x, dtype):
    """Activations in ``dtype``; A, D, delta_bias stay fp32 (as the model passes them) unless fp64."""
    wdtype = F64 if dtype == F64 else torch.float32
    return {k: v.to(wdtype if k in ("A", "D", "delta_bias") else dtype) for k, v in x.items()}


def run_scan(x, backend, dout):
    leaves = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    y = selective_scan(**leaves, delta_softplus=True, backend=backend)
    grads = torch.autograd.grad(y, [leaves[k] for k in SCAN_GRADS], dout.to(y.dtype))
    return y.detach(), dict(zip(SCAN_GRADS, grads))


def test_selective_scan_cuda_matches_ref_fp32():
    require("selective_scan_fn")
    x = cast_scan(scan_inputs(1), torch.float32)
    dout = torch.randn(B_, D_, L_, device="cuda")
    y_ref, g_ref = run_scan(x, "ref", dout)
    y, g = run_scan(x, "cuda", dout)
    assert y.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-4
    for k in SCAN_GRADS:
        assert g[k].shape == x[k].shape and g[k].dtype == x[k].dtype, k
        assert rel_err(g[k], g_ref[k]) < 1e-4, k


@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_selective_scan_cuda_lowp_budget(dtype):
    require("selective_scan_fn")
    x = cast_scan(scan_inputs(2), dtype)
    dout = torch.randn(B_, D_, L_, device="cuda").to(dtype)
    y64, g64 = run_scan({k: v.double() for k, v in x.items()}, "ref", dout.double())
    y_lp, g_lp = run_scan(x, "ref", dout)
    y, g = run_scan(x, "cuda", dout)
    assert y.dtype == dtype
    assert_budget(y, y_lp, y64, "output")
    for k in SCAN_GRADS:
        # mamba-ssm saves the pre-gate output in the input dtype and computes dz from it: two
        # low-precision roundings where the reference has one (measured ~1.8x on an H100)
        assert_budget(g[k], g_lp[k], g64[k], f"grad {k}", factor=3.0 if k == "z" else 2.0)


# --------------------------------------------------------------------------- causal conv1d


def conv_inputs(dtype, seed=3):
    """``x: (b, d, l)``, ``weight: (d, 4)``, ``bias: (d,)`` (contiguous; see :func:`run_conv`)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(B_, D_, L_, generator=g, device="cuda", dtype=F64)
    w = torch.randn(D_, 4, generator=g, device="cuda", dtype=F64) * 0.5
    bias = torch.randn(D_, generator=g, device="cuda", dtype=F64)
    return x.to(dtype), w.to(dtype), bias.to(dtype)


def run_conv(x, w, bias, backend, dout, layout="contiguous"):
    """Output and grads wrt (x, weight, bias). ``layout="channel_last"`` feeds ``x`` as the model
    does: a channel half of ``in_proj(h).transpose(1, 2)``, stride 1 along channels."""
    w, bias = (t.detach().clone().requires_grad_(True) for t in (w, bias))
    if layout == "channel_last":
        base = torch.zeros(B_, L_, 2 * D_, device=x.device, dtype=x.dtype)
        base[..., :D_] = x.transpose(1, 2)
        base.requires_grad_(True)
        xin, wrt = base.transpose(1, 2)[:, :D_], base
        assert xin.stride(1) == 1 and xin.stride(2) == 2 * D_
    else:
        xin = wrt = x.detach().clone().requires_grad_(True)
    y = causal_conv1d(xin, w, bias, activation="silu", backend=backend)
    gx, gw, gb = torch.autograd.grad(y, (wrt, w, bias), dout.to(y.dtype))
    if wrt is not xin:
        gx = gx.transpose(1, 2)[:, :D_]
    return y.detach(), (gx, gw, gb)


@pytest.mark.parametrize("layout", ["contiguous", "channel_last"])
def test_causal_conv1d_cuda_matches_ref_fp32(layout):
    require("causal_conv1d_fn")
    x, w, bias = conv_inputs(torch.float32)
    dout = torch.randn(B_, D_, L_, device="cuda")
    y_ref, g_ref = run_conv(x, w, bias, "ref", dout, layout)
    y, g = run_conv(x, w, bias, "cuda", dout, layout)
    assert rel_err(y, y_ref) < 1e-5
    for name, a, b in zip(("x", "weight", "bias"), g, g_ref):
        assert rel_err(a, b) < 1e-5, name


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channel_last"])
def test_causal_conv1d_cuda_lowp_budget(dtype, layout):
    require("causal_conv1d_fn")
    x, w, bias = conv_inputs(dtype)
    dout = torch.randn(B_, D_, L_, device="cuda").to(dtype)
    y64, g64 = run_conv(x.double(), w.double(), bias.double(), "ref", dout.double())
    y_lp, g_lp = run_conv(x, w, bias, "ref", dout, layout)
    y, g = run_conv(x, w, bias, "cuda", dout, layout)
    assert y.dtype == dtype
    assert_budget(y, y_lp, y64, "output")
    for name, a, b, c in zip(("x", "weight", "bias"), g, g_lp, g64):
        assert_budget(a, b, c, f"grad {name}")


def test_causal_conv1d_ref_equals_explicit_ref_on_cuda():
    x, w, bias = conv_inputs(torch.float32)
    assert torch.equal(causal_conv1d(x, w, bias, "silu", backend="ref"), causal_conv1d_ref(x, w, bias, "silu"))


# --------------------------------------------------------------------------- add + RMSNorm


def norm_inputs(dtype, with_residual, seed=4):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(B_, L_, D_ // 2, generator=g, device="cuda").to(dtype)
    residual = torch.randn(B_, L_, D_ // 2, generator=g, device="cuda") if with_residual else None
    weight = (1 + 0.1 * torch.randn(D_ // 2, generator=g, device="cuda")).to(dtype)
    return x, residual, weight


def run_norm(x, residual, weight, backend, dnormed, dres):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight)]
    res_leaf = residual.detach().clone().requires_grad_(True) if residual is not None else None
    normed, res = add_rms_norm(leaves[0], res_leaf, leaves[1], 1e-5, backend=backend)
    inputs = leaves + ([res_leaf] if res_leaf is not None else [])
    grads = torch.autograd.grad((normed, res), inputs, (dnormed.to(normed.dtype), dres))
    return normed.detach(), res.detach(), grads


@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_cuda_matches_torch_fp32(with_residual):
    require("rms_norm_fn")
    x, residual, weight = norm_inputs(torch.float32, with_residual)
    dn, dr = torch.randn_like(x), torch.randn_like(x)
    n_ref, r_ref, g_ref = run_norm(x, residual, weight, "ref", dn, dr)
    n, r, g = run_norm(x, residual, weight, "cuda", dn, dr)
    assert r.dtype == torch.float32
    assert torch.equal(r, r_ref)
    assert rel_err(n, n_ref) < 1e-5
    for a, b in zip(g, g_ref):
        assert rel_err(a, b) < 1e-4


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_cuda_lowp(dtype, with_residual):
    require("rms_norm_fn")
    x, residual, weight = norm_inputs(dtype, with_residual)
    dn, dr = torch.randn(x.shape, device="cuda").to(dtype), torch.randn(x.shape, device="cuda")
    n64, r64, g64 = run_norm(x.double(), None if residual is None else residual.double(), weight.double(), "ref", dn.double(), dr.double())
    n_lp, r_lp, g_lp = run_norm(x, residual, weight, "ref", dn, dr)
    n, r, g = run_norm(x, residual, weight, "cuda", dn, dr)
    assert r.dtype == torch.float32 and n.dtype == dtype
    assert torch.equal(r, r_lp)  # the residual add is one exact-order fp32 add on both paths
    assert_budget(n, n_lp, n64, "normed")
    for i, (a, b, c) in enumerate(zip(g, g_lp, g64)):
        assert_budget(a, b, c, f"grad {i}")


# --------------------------------------------------------------------------- whole model


def _vim_small4():
    torch.manual_seed(5)
    return lively(create_model("vim_small", depth=4)).eval()


def test_model_cuda_matches_ref_fp32():
    require("selective_scan_fn", "causal_conv1d_fn", "rms_norm_fn")
    model = _vim_small4().cuda()
    img = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.no_grad():
        out_ref = set_backend(model, "ref")(img)
        out_cuda = set_backend(model, "cuda")(img)
        out_auto = set_backend(model, "auto")(img)
    assert out_cuda.shape == (4, 1000)
    assert rel_err(out_cuda, out_ref) < 1e-4
    picked = ops.resolve_backend("auto", img)  # the first present of ops.AUTO_CUDA_ORDER
    assert picked in ("triton", "cuda")
    with torch.no_grad():
        out_picked = set_backend(model, picked)(img)
    assert torch.equal(out_auto, out_picked)


@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_model_cuda_lowp_budget(dtype):
    require("selective_scan_fn", "causal_conv1d_fn", "rms_norm_fn")
    model = _vim_small4().cuda().to(dtype)
    model64 = copy.deepcopy(model).double()  # the very same (rounded) weights
    img = torch.randn(4, 3, 224, 224, device="cuda").to(dtype)
    with torch.no_grad():
        out64 = set_backend(model64, "ref")(img.double())
        out_ref = set_backend(model, "ref")(img)
        out_cuda = set_backend(model, "cuda")(img)
    assert out_cuda.dtype == dtype
    assert_budget(out_cuda, out_ref, out64, "logits")


def test_model_cuda_backward_runs_and_matches_ref_fp32():
    require("selective_scan_fn", "causal_conv1d_fn", "rms_norm_fn")
    model = _vim_small4().cuda()
    img = torch.randn(2, 3, 224, 224, device="cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    grads = {}
    for backend in ("ref", "cuda"):
        loss = set_backend(model, backend)(img).square().mean()
        grads[backend] = torch.autograd.grad(loss, params)
    for a, b in zip(grads["cuda"], grads["ref"]):
        assert torch.isfinite(a).all()
        assert rel_err(a, b) < 1e-3
