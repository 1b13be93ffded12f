"""The ``triton`` backend on a GPU: :func:`bimamba_inner` and :func:`add_rms_norm` against the
float64 reference and, side by side, against the mamba-ssm / causal-conv1d kernels (``cuda``),
forward and every gradient, fp32 / fp16 / bf16, at lengths 1 … 1025 and batch 1 and 128.

fp32: relative error ≤ 1e-5. fp16/bf16: the error budget of the mamba-ssm kernels measured on
the same inputs, ``err(triton, ref64) <= 2 * err(cuda, ref64) + eps/2 * |ref64|`` (without the
kernels: ``2 * err(ref in the same dtype, ref64)``); ``eps/2`` is one rounding to the dtype, so
that a single last-bit difference in a small tensor (a per-channel gradient) cannot decide. Every input is rounded to bf16 first, so
all three dtypes see exactly the same numbers and one float64 reference serves them all.
With ``RMEETO_ERRORS_JSON=path`` every measured error is written there.

``PYTHONPATH=<kernels>:$PWD python -m pytest -m gpu tests/test_ops_triton_gpu.py``
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from compressor.inference import GraphedModel
from compressor.models import create_model, set_backend
from compressor.ops import Direction, add_rms_norm, bimamba_inner, bimamba_inner_ref, kernels_available
from helpers import lively

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

F64 = torch.float64
LENGTHS = [1, 2, 7, 76, 129, 197, 577, 1025]
# width per batch: Vim-S's d_inner at batch 1; a narrower mixer at 128 keeps the float64
# reference (it materialises (b, e, l, n) tensors) within memory and seconds
WIDTH = {1: (384, 768), 128: (32, 64)}
NAMES = ["h", "in_proj_weight"] + [f"{s}.{f}" for s in ("fwd", "bwd") for f in Direction._fields]
ERRORS: list[dict] = []


def has_cuda_kernels() -> bool:
    avail = kernels_available()
    return avail["selective_scan_fn"] and avail["causal_conv1d_fn"]


@pytest.fixture(scope="module", autouse=True)
def _no_tf32_and_report():
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
    path = os.environ.get("RMEETO_ERRORS_JSON")
    if path and ERRORS:
        worker = os.environ.get("PYTEST_XDIST_WORKER")  # one file per pytest-xdist worker
        with open(f"{path[:-5]}_{worker}.json" if worker and path.endswith(".json") else path, "w") as f:
            json.dump(ERRORS, f, indent=1)


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref).abs().max().item()


def inputs(b, l, d, e, n=16, r=None, seed=0):
    """Vim-like mixer inputs, rounded to bf16 (exactly representable in fp16 and fp32 too)."""
    r = r or math.ceil(d / 16)
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda", dtype=F64) * scale).bfloat16().double()

    def direction():
        dt = torch.exp(torch.rand(e, generator=g, device="cuda", dtype=F64) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        return Direction(rnd(e, 4, scale=0.5), rnd(e, scale=0.2), rnd(r + 2 * n, e, scale=e**-0.5), rnd(e, r, scale=r**-0.5),
                         (dt + torch.log(-torch.expm1(-dt))).bfloat16().double(),
                         (torch.log(torch.arange(1, n + 1, device="cuda", dtype=F64)).repeat(e, 1)).bfloat16().double(), rnd(e))

    return rnd(b, l, d), rnd(2 * e, d, scale=d**-0.5), direction(), direction(), rnd(b, l, e)


def run(fn, args, dtype, **kw):
    h, w_in, fwd, bwd, dy = args
    leaves = [t.to(dtype).requires_grad_(True) for t in (h, w_in, *fwd, *bwd)]
    y = fn(leaves[0], leaves[1], Direction(*leaves[2:9]), Direction(*leaves[9:]), **kw)
    return y.detach(), torch.autograd.grad(y, leaves, dy.to(dtype))


_REF64: dict = {}


def reference(b, l):
    """Inputs and the float64 reference for one shape (shared by the three dtypes)."""
    if (b, l) not in _REF64:
        _REF64.clear()  # one shape at a time: the big ones hold gigabytes
        d, e = WIDTH[b]
        args = inputs(b, l, d, e, seed=l)
        _REF64[b, l] = args, run(bimamba_inner_ref, args, F64, backend="ref")
    return _REF64[b, l]


def check(b, l, dtype, factor=2.0):
    e = WIDTH[b][1]
    args, (y64, g64) = reference(b, l)
    y, g = run(bimamba_inner, args, dtype, backend="triton")
    assert y.dtype == dtype and y.shape == (b, l, e)
    if has_cuda_kernels():
        base_name, (yb, gb) = "cuda", run(bimamba_inner_ref, args, dtype, backend="cuda")
    else:
        base_name, (yb, gb) = "ref", run(bimamba_inner_ref, args, dtype, backend="ref")
    failures = []
    for name, a, bb, ref in zip(["y"] + NAMES, [y, *g], [yb, *gb], [y64, *g64]):
        scale = ref.abs().max().item()
        err, err_b = max_err(a, ref), max_err(bb, ref)
        assert math.isfinite(err), name
        ERRORS.append(dict(b=b, l=l, dtype=str(dtype), what=name, scale=scale, err_triton=err, **{f"err_{base_name}": err_b}))
        if scale == 0:
            continue
        if dtype == torch.float32:
            ok = err <= 1e-5 * scale
        else:
            ok = err <= factor * err_b + 0.5 * torch.finfo(dtype).eps * scale
        if not ok:
            failures.append(f"{name}: triton {err / scale:.2e} vs {base_name} {err_b / scale:.2e} (relative)")
    assert not failures, "; ".join(failures)


# one float64 reference per shape: with pytest-xdist (--dist loadgroup) a shape stays on one worker
SHAPES = [pytest.param(b, l, marks=pytest.mark.xdist_group(f"{b}x{l}"), id=f"b{b}-l{l}") for b in (1, 128) for l in LENGTHS]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("b, length", SHAPES)
def test_bimamba_inner_triton_vs_ref_and_cuda(b, length, dtype):
    check(b, length, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("length", [pytest.param(l, marks=pytest.mark.xdist_group(f"1x{l}")) for l in LENGTHS])
def test_bimamba_inner_triton_inference_vs_ref_and_cuda(length, dtype):
    """Batch 1 without autograd: the shipped tile cuts the scan into pieces of the sequence
    (``TUNING`` ``ts``); same budget as the training path, against the same references."""
    from compressor.ops import _triton_bimamba as tb

    e = WIDTH[1][1]
    args, (y64, _) = reference(1, length)
    cfg = tb.scan_config("scan", 1, e)
    pieces, _ = tb.time_splits(cfg, 2 * -(-e // cfg["bd"]), length, cfg["u"])
    assert pieces > 1 or length <= 2 * cfg["u"]  # the shipped batch-1 tile does split
    h, w_in, fwd, bwd, _ = args
    with torch.no_grad():
        def go(dtype_, backend):
            c = (lambda t: t.to(dtype_))
            return bimamba_inner(c(h), c(w_in), Direction(*map(c, fwd)), Direction(*map(c, bwd)), backend=backend)
        y = go(dtype, "triton")
        base_name, yb = ("cuda", go(dtype, "cuda")) if has_cuda_kernels() else ("ref", go(dtype, "ref"))
    scale = y64.abs().max().item()
    err, err_b = max_err(y, y64), max_err(yb, y64)
    ERRORS.append(dict(b=1, l=length, dtype=str(dtype), what="y (inference)", pieces=pieces, scale=scale, err_triton=err,
                       **{f"err_{base_name}": err_b}))
    if dtype == torch.float32:
        assert err <= 1e-5 * scale, f"{pieces} pieces: {err / scale:.2e}"
    else:
        assert err <= 2.0 * err_b + 0.5 * torch.finfo(dtype).eps * scale, \
            f"{pieces} pieces: triton {err / scale:.2e} vs {base_name} {err_b / scale:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_triton(dtype, with_residual):
    g = torch.Generator(device="cuda").manual_seed(4)
    x = torch.randn(4, 197, 384, generator=g, device="cuda").to(dtype)
    residual = torch.randn(4, 197, 384, generator=g, device="cuda") if with_residual else None
    weight = (1 + 0.1 * torch.randn(384, generator=g, device="cuda")).to(dtype)
    dn = torch.randn(x.shape, generator=g, device="cuda").to(dtype)
    dr = torch.randn(x.shape, generator=g, device="cuda")

    def go(backend, cast):
        leaves = [cast(t).requires_grad_(True) for t in (x, weight)]
        res = cast(residual).requires_grad_(True) if residual is not None else None
        normed, res_out = add_rms_norm(leaves[0], res, leaves[1], 1e-5, backend=backend)
        grads = torch.autograd.grad((normed, res_out), leaves + ([res] if res is not None else []), (cast(dn), dr.to(res_out.dtype)))
        return normed, res_out, grads

    n64, r64, g64 = go("ref", lambda t: t.detach().double())
    n_lp, r_lp, g_lp = go("ref", lambda t: t.detach().clone())
    n, r, gt = go("triton", lambda t: t.detach().clone())
    assert torch.equal(r, r_lp)  # the residual add: one fp32 add on both paths
    assert n.dtype == n_lp.dtype
    for a, b_, c in zip([n, *gt], [n_lp, *g_lp], [n64, *g64]):
        scale = c.abs().max().item()
        assert max_err(a, c) <= 2 * max_err(b_, c) + 1e-5 * scale


def _model(depth=4):
    torch.manual_seed(5)
    return lively(create_model("vim_small", depth=depth).eval()).cuda()


def test_model_triton_matches_ref_and_auto_picks_it():
    model = _model()
    img = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.no_grad():
        ref = set_backend(model, "ref")(img)
        tri = set_backend(model, "triton")(img)
        auto = set_backend(model, "auto")(img)
    assert ((tri - ref).abs().max() / ref.abs().max()).item() < 1e-4
    assert torch.equal(auto, tri)  # auto picks the Triton kernels on CUDA


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_model_triton_lowp_budget(dtype):
    model = _model().to(dtype)
    import copy

    model64 = copy.deepcopy(model).double()
    img = torch.randn(4, 3, 224, 224, device="cuda").to(dtype)
    with torch.no_grad():
        out64 = set_backend(model64, "ref")(img.double())
        base = set_backend(model, "cuda" if has_cuda_kernels() else "ref")(img)
        tri = set_backend(model, "triton")(img)
    assert tri.dtype == dtype
    assert max_err(tri, out64) <= 2 * max_err(base, out64) + 1e-5 * out64.abs().max().item()


def test_model_triton_backward_matches_ref():
    model = _model(depth=2)
    img = torch.randn(2, 3, 224, 224, device="cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    grads = {}
    for backend in ("ref", "triton"):
        grads[backend] = torch.autograd.grad(set_backend(model, backend)(img).square().mean(), params)
    for (name, _), a, b in zip(model.named_parameters(), grads["triton"], grads["ref"]):
        assert torch.isfinite(a).all(), name
        assert ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() < 1e-4, name


def test_triton_model_in_a_cuda_graph():
    """Capture works (no host sync in the launchers) and replays compute what eager computes."""
    model = set_backend(_model(depth=2).half(), "triton")
    x = torch.randn(1, 3, 224, 224, device="cuda").half()
    graphed = GraphedModel(model)
    graphed(x)
    fresh = torch.randn_like(x)
    got = graphed(fresh)
    assert not graphed.note, graphed.note
    with torch.inference_mode():
        want = model(fresh)
    assert torch.equal(got, want)
