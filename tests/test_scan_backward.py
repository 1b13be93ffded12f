"""The memory-lean backward of the pure-PyTorch scans (``compressor.ops._scan_lean``):
gradients against the plain autograd forms (the oracles) in float64, the forward against the
naive float64 loop, finite differences (gradcheck), what is saved for the backward, tiling
edge cases, dtypes, and the plain form while exporting."""

from __future__ import annotations

import itertools

import pytest
import torch

import compressor.ops._scan_chunked as scan_chunked
import compressor.ops._scan_lean as lean
import compressor.ops._scan_ref as scan_ref
from compressor.ops import selective_scan, selective_scan_chunked, selective_scan_ref
from compressor.ops._scan_chunked import scan_chunked_autograd
from compressor.ops._scan_ref import scan_ref_autograd
from test_ops import GRAD_NAMES, naive_scan, scan_inputs

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")

# (backend under test, its autograd oracle)
PAIRS = [(selective_scan_ref, scan_ref_autograd), (selective_scan_chunked, scan_chunked_autograd)]
OPTIONAL = list(itertools.product([False, True], repeat=4))  # D, z, delta_bias, softplus


def _kwargs(x, use_d, use_z, use_bias, softplus):
    return dict(
        D=x["D"] if use_d else None,
        z=x["z"] if use_z else None,
        delta_bias=(x["delta_bias"] if softplus else x["delta_bias"].abs()) if use_bias else None,
        delta_softplus=softplus,
    )


def _grads(fn, x, kw, seed=123):
    """Output and gradients of every tensor input (None inputs skipped) for a random ``dy``."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in x.items() if k in ("u", "delta", "A", "B", "C")}
    opt = {k: (v.clone().requires_grad_(True) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    y = fn(**leaves, **opt)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(y.dtype)
    named = {**leaves, **{k: v for k, v in opt.items() if isinstance(v, torch.Tensor)}}
    grads = torch.autograd.grad(y, list(named.values()), dy)
    return y.detach(), dict(zip(named, grads)), y.grad_fn


@pytest.mark.parametrize("use_d,use_z,use_bias,softplus", OPTIONAL)
@pytest.mark.parametrize("length", [1, 2, 7, 76])
@pytest.mark.parametrize("fn,oracle", PAIRS, ids=["ref", "chunked"])
def test_lean_gradients_match_autograd_float64(fn, oracle, length, use_d, use_z, use_bias, softplus):
    x = scan_inputs(3, 4, length, 5, softplus=softplus, seed=length)
    kw = _kwargs(x, use_d, use_z, use_bias, softplus)
    y, g, grad_fn = _grads(fn, x, kw)
    y_ref, g_ref, ref_fn = _grads(oracle, x, kw)
    assert type(grad_fn).__name__ == "_LeanScanBackward"  # the lean path was taken...
    assert type(ref_fn).__name__ != "_LeanScanBackward"  # ...and the oracle is plain autograd
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    assert g.keys() == g_ref.keys()
    for k in g:
        assert g[k].dtype == F64 and g[k].shape == g_ref[k].shape, k
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-10, atol=1e-10, msg=lambda m, k=k: f"grad {k}: {m}")


@pytest.mark.parametrize("use_d,use_z,use_bias,softplus", [(False, False, False, False), (True, True, True, True)])
@pytest.mark.parametrize("fn", [selective_scan_ref, selective_scan_chunked], ids=["ref", "chunked"])
def test_lean_forward_matches_naive_loop(fn, use_d, use_z, use_bias, softplus):
    x = scan_inputs(2, 3, 11, 4, softplus=softplus, seed=21)
    kw = _kwargs(x, use_d, use_z, use_bias, softplus)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"])
    want = naive_scan(*args, **kw)
    leaves = [a.clone().requires_grad_(True) for a in args]
    torch.testing.assert_close(fn(*leaves, **kw).detach(), want, rtol=1e-12, atol=1e-12)  # through the Function
    torch.testing.assert_close(fn(*args, **kw), want, rtol=1e-12, atol=1e-12)  # no grad: its forward alone


@pytest.mark.parametrize("fn", [selective_scan_ref, selective_scan_chunked], ids=["ref", "chunked"])
def test_lean_backward_passes_gradcheck(fn, monkeypatch):
    """Finite differences of the formula, independent of any autograd oracle; tiny tiles (one
    batch row x 2 tokens) so that chunk carries and batch tiling are both crossed."""
    monkeypatch.setitem(lean.TILE_ELEMENTS, "cpu", 1)
    monkeypatch.setattr(lean, "CHUNK", 2)
    x = scan_inputs(2, 2, 5, 3, seed=22)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    inputs = tuple(x[k].clone().requires_grad_(True) for k in names)

    def f(u, delta, A, B, C, D, z, bias):
        return fn(u, delta, A, B, C, D, z, bias, delta_softplus=True)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("budget,chunk", [(1, 1), (1, 3), (40, 2), (1 << 20, 16), (1 << 20, 1000)])
def test_tiling_edge_cases_match_autograd(monkeypatch, budget, chunk):
    """Tiles of one row and one token, uneven batch tiles, a chunk longer than the sequence."""
    monkeypatch.setitem(lean.TILE_ELEMENTS, "cpu", budget)
    x = scan_inputs(5, 3, 9, 2, seed=23)
    kw = _kwargs(x, True, True, True, True)

    def fn(**a):
        return lean.selective_scan_lean(**a, chunk=chunk)

    y, g, _ = _grads(fn, x, kw)
    y_ref, g_ref, _ = _grads(scan_ref_autograd, x, kw)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for k in g:
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-10, atol=1e-10, msg=lambda m, k=k: f"grad {k}: {m}")


@pytest.mark.parametrize("b,l,budget", [(1, 1, 1), (7, 30, 1), (7, 30, 100), (128, 197, 1 << 20), (3, 5, 1 << 30)])
def test_tiles_cover_every_row_and_token_once(monkeypatch, b, l, budget):
    monkeypatch.setitem(lean.TILE_ELEMENTS, "cpu", budget)
    rows, chunks = lean.tiles(b, l, 4, 2, 3, torch.device("cpu"))
    assert [r for r0, r1 in rows for r in range(r0, r1)] == list(range(b))
    assert [t for t0, t1 in chunks for t in range(t0, t1)] == list(range(l))
    assert all(t1 - t0 == 3 for t0, t1 in chunks[:-1])
    sizes = [r1 - r0 for r0, r1 in rows]
    assert max(sizes) - min(sizes) <= 1  # balanced: no sliver tile
    assert max(sizes) * 3 * 4 * 2 <= max(budget, 3 * 4 * 2)  # within the budget (one row at least)


def test_noncontiguous_inputs_as_the_model_passes_them():
    """The mixer hands the scan transposed B, C and flipped z/u: strided views."""
    x = scan_inputs(2, 4, 13, 3, seed=24)
    B = x["B"].transpose(1, 2).contiguous().transpose(1, 2)  # same values, (b, n, l) with l-stride n
    C = x["C"].transpose(1, 2).contiguous().transpose(1, 2)
    z = x["z"].flip(-1).contiguous().flip(-1)
    assert not B.is_contiguous() and not C.is_contiguous()
    x2 = {**x, "B": B, "C": C}
    kw = dict(D=x["D"], z=z, delta_bias=x["delta_bias"], delta_softplus=True)
    y, g, _ = _grads(selective_scan_ref, x2, kw)
    y_ref, g_ref, _ = _grads(scan_ref_autograd, x, {**kw, "z": x["z"]})
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for k in g:
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-10, atol=1e-10)


def _saved_bytes(fn, x) -> int:
    """Bytes autograd keeps for the backward of one scan (distinct storages; the inputs count)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    leaves = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(**leaves, delta_softplus=True)
    return sum(seen.values())


def test_backward_keeps_o_bdl_not_o_bdln():
    b, d, l, n = 2, 8, 64, 16
    x = scan_inputs(b, d, l, n, dtype=torch.float32, seed=25)
    bdl = b * d * l * 4
    inputs = sum(v.numel() * 4 for v in x.values())  # u, delta, z: bdl each; B, C: b·n·l; A, D, bias
    lean_bytes = _saved_bytes(selective_scan_ref, x)
    chunked_bytes = _saved_bytes(selective_scan_chunked, x)
    # the inputs plus the state entering each chunk: b·d·n·l/CHUNK = one more (b, d, l) at n = CHUNK
    assert lean_bytes <= inputs + bdl * n / lean.CHUNK + 4096
    assert chunked_bytes <= inputs + 4096  # the chunked form keeps no states at all
    # the plain autograd forms keep a state per token
    assert _saved_bytes(scan_ref_autograd, x) >= bdl * n
    assert _saved_bytes(scan_chunked_autograd, x) >= bdl * n


def test_forward_with_and_without_grad_is_the_same_computation():
    x = scan_inputs(3, 8, 40, 16, dtype=torch.float32, seed=26)
    with torch.no_grad():
        y0 = selective_scan_ref(**x, delta_softplus=True)
    leaves = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    y1 = selective_scan_ref(**leaves, delta_softplus=True)
    assert torch.equal(y0, y1.detach())
    # and within fp32 rounding of the written-out reference (the CPU default before the Function)
    y_ref = scan_ref_autograd(**x, delta_softplus=True)
    assert ((y0 - y_ref).abs().max() / y_ref.abs().max()).item() < 1e-6


def test_chunked_forward_is_bit_identical_to_its_autograd_form():
    x = scan_inputs(2, 8, 50, 16, dtype=torch.float32, seed=27)
    leaves = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    for chunk in (None, 5):
        want = scan_chunked_autograd(**x, delta_softplus=True, chunk=chunk)
        assert torch.equal(selective_scan_chunked(**leaves, delta_softplus=True, chunk=chunk).detach(), want)
        assert torch.equal(selective_scan_chunked(**x, delta_softplus=True, chunk=chunk), want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gradients_come_back_in_each_inputs_dtype(dtype):
    x = scan_inputs(2, 4, 9, 3, dtype=dtype, seed=28)
    x["A"], x["D"], x["delta_bias"] = x["A"].float(), x["D"].float(), x["delta_bias"].float()  # as the model passes them
    y, g, _ = _grads(selective_scan_ref, x, dict(D=x["D"], z=x["z"], delta_bias=x["delta_bias"], delta_softplus=True))
    assert y.dtype == dtype
    for k in ("u", "delta", "B", "C", "z"):
        assert g[k].dtype == dtype, k
    for k in ("A", "D", "delta_bias"):
        assert g[k].dtype == torch.float32, k
    x64 = {k: v.double() for k, v in x.items()}
    _, g64, _ = _grads(scan_ref_autograd, x64, dict(D=x64["D"], z=x64["z"], delta_bias=x64["delta_bias"], delta_softplus=True))
    budget = {torch.float16: 2e-2, torch.bfloat16: 1e-1, torch.float32: 1e-5}[dtype]
    for k in GRAD_NAMES:
        err = ((g[k].double() - g64[k]).abs().max() / g64[k].abs().max()).item()
        assert err < budget, (k, err)


def test_only_requested_gradients_are_computed():
    x = scan_inputs(2, 3, 6, 2, seed=29)
    u = x["u"].clone().requires_grad_(True)
    y = selective_scan_ref(u, x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True)
    (gu,) = torch.autograd.grad(y.sum(), [u])
    y_ref = scan_ref_autograd(u, x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True)
    (gu_ref,) = torch.autograd.grad(y_ref.sum(), [u])
    torch.testing.assert_close(gu, gu_ref, rtol=1e-10, atol=1e-10)


def test_exporting_uses_the_plain_differentiable_forms(monkeypatch):
    x = scan_inputs(2, 3, 6, 2, seed=30)
    leaves = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    for mod in (scan_ref, scan_chunked):
        monkeypatch.setattr(mod, "exporting", lambda: True)
    assert type(selective_scan_ref(**leaves).grad_fn).__name__ != "_LeanScanBackward"
    assert type(selective_scan_chunked(**leaves).grad_fn).__name__ != "_LeanScanBackward"
    monkeypatch.undo()
    assert type(selective_scan_ref(**leaves).grad_fn).__name__ == "_LeanScanBackward"
    assert type(selective_scan(**leaves, backend="auto").grad_fn).__name__ == "_LeanScanBackward"


def test_large_decays_stay_finite_in_the_lean_backward():
    """Δ·A down to -400 per step (exp2 underflows to 0): states and gradients stay finite."""
    b, d, l, n = 2, 3, 40, 4
    x = scan_inputs(b, d, l, n, dtype=torch.float32, seed=31)
    x["A"] = -torch.logspace(-3, 2.6, n).expand(d, n).contiguous()
    x["delta"] = x["delta"] * 10.0
    for fn in (selective_scan_ref, selective_scan_chunked):
        y, g, _ = _grads(fn, x, dict(D=x["D"], z=x["z"], delta_bias=x["delta_bias"], delta_softplus=True))
        assert torch.isfinite(y).all()
        assert all(torch.isfinite(v).all() for v in g.values())
