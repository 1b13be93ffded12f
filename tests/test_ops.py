"""CPU tests of compressor.ops: reference scan vs a naive float64 loop, chunked vs reference
(outputs and gradients), known answers, the causal conv, add+RMSNorm, the dispatcher, and the
model on both pure-PyTorch backends (plus an fx trace with Block/RMSNorm/TokenReadout as leaves)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.fx
import torch.nn.functional as F

import compressor.ops as ops
from compressor.errors import BackendUnavailable
from compressor.models import create_model, set_backend
from compressor.ops import (
    add_rms_norm,
    causal_conv1d,
    causal_conv1d_ref,
    resolve_backend,
    selective_scan,
    selective_scan_chunked,
    selective_scan_ref,
)
from helpers import lively

F64 = torch.float64


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs difference relative to the reference's max magnitude."""
    a, ref = a.double(), ref.double()
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def scan_inputs(b, d, l, n, dtype=F64, seed=0, softplus=True):
    """Random scan inputs (all optional ones present). ``delta`` is raw (pre-softplus) when
    ``softplus``, else already positive."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=F64)

    delta = r(b, d, l) - 1.0 if softplus else torch.rand(b, d, l, generator=g, dtype=F64) * 0.5 + 0.01
    x = dict(
        u=r(b, d, l),
        delta=delta,
        A=-torch.exp(r(d, n) * 0.5),
        B=r(b, n, l),
        C=r(b, n, l),
        D=r(d),
        z=r(b, d, l),
        delta_bias=r(d) * 0.5,
    )
    return {k: v.to(dtype) for k, v in x.items()}


# --------------------------------------------------------------------------- naive float64 loop


def naive_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Straight from the formula, one scalar at a time in Python floats (float64)."""
    u, delta, A, B, C = (t.double().tolist() for t in (u, delta, A, B, C))
    D = D.double().tolist() if D is not None else None
    z = z.double().tolist() if z is not None else None
    bias = delta_bias.double().tolist() if delta_bias is not None else None
    nb, nd, nl, nn_ = len(u), len(u[0]), len(u[0][0]), len(A[0])
    out = [[[0.0] * nl for _ in range(nd)] for _ in range(nb)]
    for bi in range(nb):
        for di in range(nd):
            h = [0.0] * nn_
            for t in range(nl):
                dt = delta[bi][di][t] + (bias[di] if bias is not None else 0.0)
                if delta_softplus:
                    dt = dt if dt > 20.0 else math.log1p(math.exp(dt))
                ut = u[bi][di][t]
                y = 0.0
                for k in range(nn_):
                    h[k] = math.exp(dt * A[di][k]) * h[k] + dt * ut * B[bi][k][t]
                    y += C[bi][k][t] * h[k]
                if D is not None:
                    y += D[di] * ut
                if z is not None:
                    zt = z[bi][di][t]
                    y *= zt / (1.0 + math.exp(-zt))
                out[bi][di][t] = y
    return torch.tensor(out, dtype=F64)


@pytest.mark.parametrize(
    "use_d,use_z,use_bias,softplus", list(itertools.product([False, True], repeat=4))
)
def test_ref_matches_naive_loop(use_d, use_z, use_bias, softplus):
    x = scan_inputs(2, 3, 9, 4, softplus=softplus, seed=1)
    kw = dict(
        D=x["D"] if use_d else None,
        z=x["z"] if use_z else None,
        delta_bias=x["delta_bias"] if use_bias else None,
        delta_softplus=softplus,
    )
    if use_bias and not softplus:  # keep delta positive without softplus
        kw["delta_bias"] = x["delta_bias"].abs()
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"])
    want = naive_scan(*args, **kw)
    got = selective_scan_ref(*args, **kw)
    assert got.dtype == F64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_ref_matches_naive_loop_softplus_threshold():
    """Δ above softplus's threshold (20) passes through unchanged, as in the kernels."""
    x = scan_inputs(1, 2, 5, 3, seed=2)
    delta = torch.tensor([[[25.0, -3.0, 21.0, 0.5, 19.0], [-30.0, 30.0, 0.0, 2.0, -1.0]]], dtype=F64)
    A = -torch.full((2, 3), 0.01, dtype=F64)
    args = (x["u"][:1], delta, A, x["B"][:1], x["C"][:1])
    want = naive_scan(*args, D=x["D"], delta_softplus=True)
    got = selective_scan_ref(*args, D=x["D"], delta_softplus=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- chunked vs reference

GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def scan_with_grads(fn, x, **kw):
    leaves = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    y = fn(**leaves, delta_softplus=True, **kw)
    g = torch.Generator().manual_seed(123)
    dy = torch.randn(y.shape, generator=g, dtype=F64).to(y.dtype)
    grads = torch.autograd.grad(y, [leaves[k] for k in GRAD_NAMES], dy)
    return y.detach(), dict(zip(GRAD_NAMES, grads))


@pytest.mark.parametrize("length", [1, 2, 7, 16, 197])
@pytest.mark.parametrize("chunk", [None, 1, 5, 64])
def test_chunked_matches_ref_float64(length, chunk):
    x = scan_inputs(2, 3, length, 4, seed=length)
    y_ref, g_ref = scan_with_grads(selective_scan_ref, x)
    y, g = scan_with_grads(selective_scan_chunked, x, chunk=chunk)
    assert y.dtype == F64
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for k in GRAD_NAMES:
        assert g[k].dtype == F64, k
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-10, atol=1e-10, msg=lambda m, k=k: f"grad {k}: {m}")


@pytest.mark.parametrize("chunk", [None, 3])
def test_chunked_matches_ref_without_optional_inputs(chunk):
    x = scan_inputs(2, 3, 11, 4, softplus=False, seed=3)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"])
    torch.testing.assert_close(
        selective_scan_chunked(*args, chunk=chunk), selective_scan_ref(*args), rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize("length,chunk", [(197, None), (197, 5), (64, 64), (30, 1)])
def test_chunked_matches_ref_float32(length, chunk):
    x = scan_inputs(2, 8, length, 16, dtype=torch.float32, seed=4)
    y_ref, g_ref = scan_with_grads(selective_scan_ref, x)
    y, g = scan_with_grads(selective_scan_chunked, x, chunk=chunk)
    assert y.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-5
    for k in GRAD_NAMES:
        assert g[k].dtype == torch.float32
        assert rel_err(g[k], g_ref[k]) < 1e-5, k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pure_torch_scans_keep_low_precision_dtype(dtype):
    x = scan_inputs(1, 4, 10, 3, dtype=dtype, seed=5)
    x["A"], x["D"], x["delta_bias"] = x["A"].float(), x["D"].float(), x["delta_bias"].float()
    y_ref = selective_scan_ref(**x, delta_softplus=True)
    y = selective_scan_chunked(**x, delta_softplus=True)
    assert y_ref.dtype == y.dtype == dtype
    assert rel_err(y, y_ref) < 1e-2


# --------------------------------------------------------------------------- known answers


@pytest.mark.parametrize("fn", [selective_scan_ref, selective_scan_chunked])
def test_known_answer_geometric_decay(fn):
    """Δ = 1, exp(ΔA) = 1/2, B = C = u = 1: h_t = 1/2 h_{t-1} + 1, so y_t = 2 - 2^-t (t from 0)."""
    l = 12
    u = torch.ones(1, 1, l, dtype=F64)
    delta = torch.ones(1, 1, l, dtype=F64)
    A = torch.full((1, 1), -math.log(2.0), dtype=F64)
    ones = torch.ones(1, 1, l, dtype=F64)
    t = torch.arange(l, dtype=F64)
    want = 2.0 - 0.5**t
    torch.testing.assert_close(fn(u, delta, A, ones, ones)[0, 0], want, rtol=1e-14, atol=1e-14)
    # the same through the bias + softplus path: softplus(0 + log(e - 1)) = 1
    bias = torch.full((1,), math.log(math.e - 1.0), dtype=F64)
    y = fn(u, torch.zeros_like(delta), A, ones, ones, delta_bias=bias, delta_softplus=True)
    torch.testing.assert_close(y[0, 0], want, rtol=1e-14, atol=1e-14)
    # skip term D·u adds 3; gate z = 0 gives silu(0) = 0
    D = torch.full((1,), 3.0, dtype=F64)
    torch.testing.assert_close(fn(u, delta, A, ones, ones, D=D)[0, 0], want + 3.0, rtol=1e-14, atol=1e-14)
    assert fn(u, delta, A, ones, ones, D=D, z=torch.zeros_like(u)).abs().max().item() == 0.0


@pytest.mark.parametrize("fn", [selective_scan_ref, selective_scan_chunked])
def test_known_answer_two_states(fn):
    """Two states, decays 1/2 and 1/4, one pulse u_0 = 1: y_t = C0·2^-t + C1·4^-t."""
    l = 9
    u = torch.zeros(1, 1, l, dtype=F64)
    u[..., 0] = 1.0
    delta = torch.ones(1, 1, l, dtype=F64)
    A = torch.tensor([[-math.log(2.0), -math.log(4.0)]], dtype=F64)
    B = torch.ones(1, 2, l, dtype=F64)
    C = torch.tensor([5.0, -7.0], dtype=F64)[None, :, None].expand(1, 2, l)
    t = torch.arange(l, dtype=F64)
    want = 5.0 * 0.5**t - 7.0 * 0.25**t
    torch.testing.assert_close(fn(u, delta, A, B, C)[0, 0], want, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("chunk", [None, 4])
def test_chunked_large_decays_stay_finite(dtype, chunk):
    """Δ·A ≈ -200 per step: the state forgets at once (h_t = Δ u_t B_t); no inf/nan anywhere."""
    b, d, l, n = 2, 3, 50, 4
    x = scan_inputs(b, d, l, n, dtype=dtype, seed=6)
    x["A"] = torch.full((d, n), -200.0, dtype=dtype)
    x["delta"] = torch.ones(b, d, l, dtype=dtype)
    leaves = {k: v.clone().requires_grad_(True) for k, v in x.items() if k in ("u", "delta", "A", "B", "C")}
    y = selective_scan_chunked(**leaves, chunk=chunk)
    grads = torch.autograd.grad(y.sum(), list(leaves.values()))
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(g).all() for g in grads)
    want = torch.einsum("bdl,bnl->bdl", x["u"] * x["delta"], x["B"] * x["C"])
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    # decays spread over [-400, -1e-3] per step, big Δ via softplus: agree with the reference
    x = scan_inputs(b, d, l, n, dtype=dtype, seed=7)
    x["A"] = -torch.logspace(-3, 2.6, n, dtype=dtype).expand(d, n).contiguous()
    x["delta"] = x["delta"] * 10.0
    y = selective_scan_chunked(**x, delta_softplus=True, chunk=chunk)
    assert torch.isfinite(y).all()
    assert rel_err(y, selective_scan_ref(**x, delta_softplus=True)) < 1e-5


# --------------------------------------------------------------------------- causal conv


def naive_causal_conv(x, weight, bias, activation):
    b, d, l = x.shape
    w = weight.shape[1]
    out = torch.zeros(b, d, l, dtype=F64)
    for bi in range(b):
        for di in range(d):
            for t in range(l):
                acc = float(bias[di]) if bias is not None else 0.0
                for k in range(w):
                    s = t - (w - 1) + k
                    if s >= 0:
                        acc += float(weight[di, k]) * float(x[bi, di, s])
                if activation == "silu":
                    acc = acc / (1.0 + math.exp(-acc))
                out[bi, di, t] = acc
    return out


@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("width", [2, 4])
def test_causal_conv1d_ref_matches_naive(use_bias, activation, width):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 7, generator=g, dtype=F64)
    w = torch.randn(3, width, generator=g, dtype=F64)
    bias = torch.randn(3, generator=g, dtype=F64) if use_bias else None
    got = causal_conv1d_ref(x, w, bias, activation)
    assert got.shape == x.shape
    torch.testing.assert_close(got, naive_causal_conv(x, w, bias, activation), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(causal_conv1d(x, w, bias, activation, backend="auto"), got, rtol=0, atol=0)


@pytest.mark.parametrize("t0", [0, 5, 12])
def test_causal_conv1d_is_causal(t0):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 4, 13, generator=g)
    w = torch.randn(4, 4, generator=g)
    bias = torch.randn(4, generator=g)
    y = causal_conv1d_ref(x, w, bias, "silu")
    x2 = x.clone()
    x2[..., t0] += 10.0
    y2 = causal_conv1d_ref(x2, w, bias, "silu")
    assert torch.equal(y[..., :t0], y2[..., :t0])
    assert (y[..., t0] != y2[..., t0]).all()


# --------------------------------------------------------------------------- add + RMSNorm


def naive_add_rms_norm(x, residual, weight, eps):
    r = x.double() if residual is None else residual.double() + x.double()
    return r / torch.sqrt((r * r).mean(-1, keepdim=True) + eps) * weight.double(), r


@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_matches_naive(with_residual):
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 5, 16, generator=g)
    residual = torch.randn(2, 5, 16, generator=g) if with_residual else None
    weight = torch.randn(16, generator=g)
    normed, res = add_rms_norm(x, residual, weight, 1e-5)
    want_normed, want_res = naive_add_rms_norm(x, residual, weight, 1e-5)
    assert normed.dtype == res.dtype == torch.float32
    torch.testing.assert_close(normed.double(), want_normed, rtol=1e-6, atol=1e-6)
    assert torch.equal(res, x if residual is None else residual + x)  # one fp32 add
    torch.testing.assert_close(res.double(), want_res, rtol=1e-7, atol=1e-7)


def test_add_rms_norm_float64_stays_float64():
    g = torch.Generator().manual_seed(11)
    x, residual = torch.randn(2, 3, 8, generator=g, dtype=F64), torch.randn(2, 3, 8, generator=g, dtype=F64)
    weight = torch.randn(8, generator=g, dtype=F64)
    normed, res = add_rms_norm(x, residual, weight, 1e-5)
    want_normed, want_res = naive_add_rms_norm(x, residual, weight, 1e-5)
    assert normed.dtype == res.dtype == F64
    torch.testing.assert_close(normed, want_normed, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(res, want_res, rtol=0, atol=0)


def test_add_rms_norm_fp16_keeps_residual_fp32():
    g = torch.Generator().manual_seed(12)
    x = (torch.randn(2, 5, 16, generator=g) * 100).half()
    weight = torch.randn(16, generator=g).half()
    normed, res = add_rms_norm(x, None, weight, 1e-5)
    assert res.dtype == torch.float32 and normed.dtype == torch.float16
    assert torch.equal(res, x.float())
    # a fp32 residual plus a small fp16 update: the update is not lost to fp16 rounding
    residual = torch.full((2, 5, 16), 1000.0)
    small = torch.full((2, 5, 16), 0.01, dtype=torch.float16)
    _, res2 = add_rms_norm(small, residual, weight, 1e-5)
    assert res2.dtype == torch.float32
    assert torch.equal(res2, residual + small.float())
    assert (res2 != 1000.0).all()  # 1000 + 0.01 would round back to 1000 in fp16
    want_normed, _ = naive_add_rms_norm(x, None, weight, 1e-5)
    torch.testing.assert_close(normed.double(), want_normed, rtol=2e-3, atol=2e-3)


# --------------------------------------------------------------------------- dispatcher


def test_auto_backend_on_cpu_is_ref():
    x = torch.zeros(1, 2, 3)
    assert resolve_backend("auto", x) == "ref"
    assert resolve_backend("ref", x) == "ref"
    assert resolve_backend("chunked", x) == "chunked"


def test_exporting_uses_the_export_form(monkeypatch):
    monkeypatch.setattr(ops, "_exporting", lambda: True)
    x = torch.zeros(1, 2, 3)
    assert resolve_backend("auto", x) == ops.EXPORT_SCAN_DEFAULT == "loop"
    assert resolve_backend("cuda", x) == "loop"
    assert resolve_backend("ref", x) == "ref" and resolve_backend("ssd", x) == "ssd"


def test_unknown_backend_raises_one_line():
    with pytest.raises(BackendUnavailable) as exc:
        resolve_backend("tpu", torch.zeros(1))
    msg = str(exc.value)
    assert "\n" not in msg and "tpu" in msg and "chunked" in msg
    with pytest.raises(BackendUnavailable):
        set_backend(create_model("vim_test"), "tpu")
    with pytest.raises(BackendUnavailable):
        add_rms_norm(torch.zeros(1, 2, 4), None, torch.ones(4), 1e-5, backend="tpu")


def test_cuda_backend_without_kernels_says_pip_install(monkeypatch):
    monkeypatch.setattr(ops._kernels, "load", lambda name: None)  # as on a machine without kernels
    x = scan_inputs(1, 2, 3, 2, dtype=torch.float32)
    for call in (
        lambda: selective_scan(**x, backend="cuda"),
        lambda: causal_conv1d(x["u"], torch.ones(2, 4), backend="cuda"),
        lambda: add_rms_norm(x["u"], None, torch.ones(3), 1e-5, backend="cuda"),
    ):
        with pytest.raises(BackendUnavailable) as exc:
            call()
        assert "pip install" in str(exc.value)
        assert "\n" not in str(exc.value)


def test_cuda_backend_on_cpu_tensor_raises():
    """Whether or not the kernels import here, CPU tensors can't take the cuda backend."""
    x = scan_inputs(1, 2, 3, 2, dtype=torch.float32)
    with pytest.raises(BackendUnavailable) as exc:
        selective_scan(**x, backend="cuda")
    assert "\n" not in str(exc.value)
    if not ops.kernels_available()["selective_scan_fn"]:
        assert "pip install" in str(exc.value)
    model = set_backend(create_model("vim_test").eval(), "cuda")
    with pytest.raises(BackendUnavailable):
        model(torch.zeros(1, 3, 32, 32))


def test_kernels_available_never_raises():
    avail = ops.kernels_available()
    assert set(avail) == {"selective_scan_fn", "causal_conv1d_fn", "rms_norm_fn"}
    assert all(isinstance(v, bool) for v in avail.values())


def test_dispatch_routes_to_the_named_implementation():
    x = scan_inputs(2, 3, 10, 4, dtype=torch.float32, seed=13)
    assert torch.equal(selective_scan(**x, delta_softplus=True, backend="ref"), selective_scan_ref(**x, delta_softplus=True))
    assert torch.equal(selective_scan(**x, delta_softplus=True, backend="auto"), selective_scan_ref(**x, delta_softplus=True))
    assert torch.equal(
        selective_scan(**x, delta_softplus=True, backend="chunked"), selective_scan_chunked(**x, delta_softplus=True)
    )


# --------------------------------------------------------------------------- model level


def _model_outputs_and_grads(model, img, backend):
    set_backend(model, backend)
    model.zero_grad(set_to_none=True)
    out = model(img)
    loss = out.square().mean() + out[:, 0].sum()
    params = [p for p in model.parameters() if p.requires_grad]
    return out.detach(), torch.autograd.grad(loss, params)


def test_model_ref_vs_chunked_forward_and_grads():
    torch.manual_seed(14)
    model = lively(create_model("vim_test").eval())
    img = torch.randn(2, 3, 32, 32)
    out_ref, g_ref = _model_outputs_and_grads(model, img, "ref")
    out_chk, g_chk = _model_outputs_and_grads(model, img, "chunked")
    assert out_ref.shape == (2, 10)
    assert not torch.equal(out_chk, out_ref)  # the backends really differ in rounding...
    assert rel_err(out_chk, out_ref) < 1e-5  # ...but agree to fp32 precision
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, g_chk, g_ref):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < 1e-4, name


@pytest.mark.parametrize("backend", ["ref", "chunked"])
def test_model_trains_with_drop_path_on_cpu(backend):
    torch.manual_seed(15)
    model = set_backend(create_model("vim_test", drop_path_rate=0.3), backend).train()
    img = torch.randn(4, 3, 32, 32)
    loss = F.cross_entropy(model(img), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


# --------------------------------------------------------------------------- torch.fx


def test_fx_trace_with_leaf_blocks_reproduces_eager_exactly():
    torch.manual_seed(16)
    model = lively(create_model("vim_test").eval())
    from compressor.fx import trace

    gm = trace(model)
    graph = gm.graph
    called = [n.target for n in graph.nodes if n.op == "call_module"]
    assert sum(t.startswith("layers.") for t in called) == model.cfg.depth
    assert "norm_f" in called and "readout" in called
    img = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        for backend in ("ref", "chunked"):
            set_backend(model, backend)
            assert torch.equal(gm(img), model(img))
