"""The ``triton`` op backend (rmeeto's own kernels for the bidirectional mixer and add+RMSNorm)
against the pure-PyTorch reference, forward and every gradient, in fp32. Without CUDA the
kernels run in Triton's CPU interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1``), so
shapes stay tiny; ``tests/test_ops_triton_gpu.py`` covers real sizes and fp16/bf16 on a GPU."""

from __future__ import annotations

import math

import pytest
import torch

import compressor.ops as ops
from compressor.errors import BackendUnavailable
from compressor.models import create_model, set_backend
from compressor.ops import Direction, add_rms_norm, bimamba_inner, bimamba_inner_ref, resolve_backend
from compressor.ops import _triton_bimamba as tb

pytestmark = [
    pytest.mark.skipif(not tb.available(), reason="Triton is not installed"),
    pytest.mark.skipif(not torch.cuda.is_available() and not tb.interpreting(),
                       reason="no CUDA and Triton's interpreter is off (TRITON_INTERPRET=1 before import)"),
    pytest.mark.usefixtures("one_thread"),
]

F64 = torch.float64
DEV = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ["h", "in_proj_weight"] + [f"{side}.{f}" for side in ("fwd", "bwd") for f in Direction._fields]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs difference relative to the reference's max magnitude."""
    a, ref = a.double(), ref.double()
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def mixer_inputs(b, l, d=4, e=8, n=4, r=2, w=4, seed=0, conv_bias=True):
    """Random mixer inputs in float64 with Vim-like magnitudes: log-uniform Δ in [1e-3, 0.1]
    through the bias, S4D-real ``A_log = log(1..n)`` plus noise, unit-scale projections."""
    g = torch.Generator().manual_seed(seed)

    def r_(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=F64) * scale

    def direction():
        dt = torch.exp(torch.rand(e, generator=g, dtype=F64) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        return Direction(
            conv_weight=r_(e, w, scale=0.5), conv_bias=r_(e, scale=0.2) if conv_bias else None,
            x_proj_weight=r_(r + 2 * n, e, scale=e**-0.5), dt_proj_weight=r_(e, r, scale=r**-0.5),
            dt_proj_bias=dt + torch.log(-torch.expm1(-dt)) + 1.0,
            A_log=torch.log(torch.arange(1, n + 1, dtype=F64)).repeat(e, 1) + r_(e, n, scale=0.1), D=r_(e),
        )

    return r_(b, l, d), r_(2 * e, d, scale=d**-0.5), direction(), direction()


def run(fn, h, w_in, fwd, bwd, dy, dtype, **kw):
    """Output and the gradients of ``<y, dy>`` w.r.t. every input, in ``dtype``."""
    cast = (lambda t: None if t is None else t.to(DEV, dtype).requires_grad_(True))
    h, w_in = cast(h), cast(w_in)
    fwd, bwd = Direction(*map(cast, fwd)), Direction(*map(cast, bwd))
    y = fn(h, w_in, fwd, bwd, **kw)
    leaves = [t for t in (h, w_in, *fwd, *bwd)]
    live = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, live, dy.to(DEV, dtype)))
    return y.detach(), [None if t is None else next(grads) for t in leaves]


def check_against_ref(b, l, tol=1e-5, divide_out=True, **kw):
    h, w_in, fwd, bwd = mixer_inputs(b, l, **kw)
    dy = torch.randn(b, l, fwd.D.shape[0], generator=torch.Generator().manual_seed(9), dtype=F64)
    y64, g64 = run(bimamba_inner_ref, h, w_in, fwd, bwd, dy, F64, divide_out=divide_out, backend="ref")
    y, g = run(bimamba_inner, h, w_in, fwd, bwd, dy, torch.float32, divide_out=divide_out, backend="triton")
    assert y.shape == (b, l, fwd.D.shape[0]) and y.dtype == torch.float32
    assert rel_err(y, y64) < tol, f"output: {rel_err(y, y64):.2e}"
    for name, a, ref in zip(NAMES, g, g64):
        if ref is None:
            assert a is None, name
            continue
        assert a.shape == ref.shape and a.dtype == torch.float32, name
        if l == 1 and name.endswith("A_log"):  # one token: the state starts at 0, A has no effect
            assert a.abs().max() == 0 and ref.abs().max() == 0
            continue
        assert rel_err(a, ref) < tol, f"grad {name}: {rel_err(a, ref):.2e}"


@pytest.mark.parametrize("length", [1, 2, 7])
def test_bimamba_inner_matches_ref_fp32(length):
    check_against_ref(2, length)


def test_bimamba_inner_long_sequence_crosses_saved_states(monkeypatch):
    """76 tokens: several state segments in the backward, a ragged last one."""
    monkeypatch.setitem(tb.TUNING, "save_every", 16)
    check_against_ref(1, 76)


@pytest.mark.parametrize("save_every", [4, 8])
def test_bimamba_inner_any_segment_length(monkeypatch, save_every):
    monkeypatch.setitem(tb.TUNING, "save_every", save_every)
    monkeypatch.setitem(tb.TUNING, "scan", {"bd": 32, "u": 4})
    check_against_ref(1, 9)


@pytest.mark.parametrize("length, u", [(1, 2), (7, 4), (9, 2)])
def test_bimamba_inner_prefetch_matches_ref(monkeypatch, length, u):
    """``pf: 1`` (the next steps' loads issued a loop iteration early): the same results, with a
    ragged last iteration and segments of saved states that it crosses."""
    monkeypatch.setitem(tb.TUNING, "save_every", 4)
    for key in ("scan", "scan_small"):
        monkeypatch.setitem(tb.TUNING, key, {"bd": 32, "u": u, "pf": 1})
    check_against_ref(1, length)


@pytest.mark.parametrize("length, u, ts, pf", [(1, 2, 4, 0), (7, 2, 3, 0), (13, 2, 4, 0), (29, 4, 8, 0), (13, 2, 4, 1)])
def test_bimamba_inner_time_split_inference_matches_ref(monkeypatch, length, u, ts, pf):
    """Inference with the sequence cut into pieces (``ts``: end states first, then every piece
    from its chained entering state): the reference's output, a ragged last piece included."""
    monkeypatch.setitem(tb.TUNING, "scan_small", {"bd": 32, "u": u, "ts": ts, "pf": pf})
    pieces, steps = tb.time_splits(tb.TUNING["scan_small"], 2, length, u)
    assert pieces == -(-length // steps) and steps % u == 0 and pieces <= ts
    assert pieces > 1 or length <= u  # the cases above really split
    for divide_out in (True, False):
        h, w_in, fwd, bwd = mixer_inputs(1, length, e=40, n=4)
        y64 = bimamba_inner_ref(h, w_in, fwd, bwd, divide_out=divide_out)
        f32 = (lambda t: None if t is None else t.to(DEV, torch.float32))
        with torch.no_grad():
            y = bimamba_inner(f32(h), f32(w_in), Direction(*map(f32, fwd)), Direction(*map(f32, bwd)),
                              divide_out=divide_out, backend="triton")
        assert rel_err(y.cpu(), y64) < 1e-5, f"{rel_err(y.cpu(), y64):.2e}"


def test_time_splits_follow_the_grid(monkeypatch):
    """Pieces only while the grid is small, never more than the tile's ``ts`` or the length."""
    monkeypatch.setitem(tb.TUNING, "split_programs", 512)
    cfg = {"bd": 32, "u": 4, "ts": 8}
    assert tb.time_splits(cfg, 48, 197, 4) == (8, 28)  # Vim-S batch 1: 24 channel blocks x 2
    assert tb.time_splits(cfg, 128, 197, 4) == (4, 52)
    assert tb.time_splits(cfg, 384, 197, 4) == (1, 200)  # batch 8: already 384 programs
    assert tb.time_splits(cfg, 48, 5, 4) == (2, 4)
    assert tb.time_splits({"bd": 32, "u": 4}, 48, 197, 4) == (1, 200)


def test_bimamba_inner_sum_of_directions_and_no_conv_bias():
    """VideoMamba sums the directions (``divide_out=False``); a conv without bias."""
    check_against_ref(1, 5, divide_out=False, conv_bias=False, n=8)


def test_bimamba_inner_channel_blocks_and_many_states(monkeypatch):
    """More channels than one program holds (masked last block) and 16 states in 2 vectors."""
    monkeypatch.setitem(tb.TUNING, "scan", {"bd": 32, "u": 2})
    monkeypatch.setitem(tb.TUNING, "scan_small", {"bd": 32, "u": 2})
    monkeypatch.setitem(tb.TUNING, "scan_bwd", {"bd": 32})
    monkeypatch.setitem(tb.TUNING, "scan_bwd_small", {"bd": 32})
    monkeypatch.setitem(tb.TUNING, "conv", {"bl": 4, "bd": 32, "warps": 1})
    check_against_ref(1, 6, e=40, n=16, r=3)


def test_bimamba_inner_known_answer_without_state():
    """Zero B and C: the scan contributes nothing and ``y = silu(z) (D_f u_f + D_b u_b) / 2``
    where ``u`` are the two convolutions; a single tap makes those the input itself."""
    h, w_in, fwd, bwd = mixer_inputs(1, 5, conv_bias=False)
    e = fwd.D.shape[0]
    one_tap = torch.zeros(e, 4, dtype=F64)
    one_tap[:, -1] = 1.0  # causal conv with only the current token: u_f = silu(x)
    fwd = fwd._replace(conv_weight=one_tap, x_proj_weight=torch.cat([fwd.x_proj_weight[:2], torch.zeros(8, e, dtype=F64)]))
    bwd = bwd._replace(conv_weight=one_tap, x_proj_weight=torch.cat([bwd.x_proj_weight[:2], torch.zeros(8, e, dtype=F64)]))
    with torch.no_grad():
        y = bimamba_inner(h.float().to(DEV), w_in.float().to(DEV), Direction(*(t.float().to(DEV) if t is not None else None for t in fwd)),
                          Direction(*(t.float().to(DEV) if t is not None else None for t in bwd)), backend="triton")
    xz = h @ w_in.t()
    x, z = xz[..., :e], xz[..., e:]
    silu = torch.nn.functional.silu
    want = silu(z) * silu(x) * (fwd.D + bwd.D) / 2
    assert rel_err(y.cpu(), want) < 1e-6


# --------------------------------------------------------------------------- add + RMSNorm


@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_triton_matches_ref(with_residual):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 24, generator=g)
    residual = torch.randn(2, 5, 24, generator=g) if with_residual else None
    weight = 1 + 0.1 * torch.randn(24, generator=g)
    dn, dr = torch.randn(2, 5, 24, generator=g), torch.randn(2, 5, 24, generator=g)
    outs = {}
    for backend in ("ref", "triton"):
        leaves = [t.clone().to(DEV).requires_grad_(True) for t in (x, weight)]
        res = residual.clone().to(DEV).requires_grad_(True) if with_residual else None
        normed, res_out = add_rms_norm(leaves[0], res, leaves[1], 1e-5, backend=backend)
        inputs = leaves + ([res] if res is not None else [])
        outs[backend] = (normed, res_out, torch.autograd.grad((normed, res_out), inputs, (dn.to(DEV), dr.to(DEV))))
    (n_r, r_r, g_r), (n_t, r_t, g_t) = outs["ref"], outs["triton"]
    assert r_t.dtype == torch.float32 and n_t.dtype == torch.float32
    assert torch.equal(r_t, r_r)  # one fp32 add on both paths
    assert rel_err(n_t, n_r) < 1e-6
    for a, b in zip(g_t, g_r):
        assert rel_err(a, b) < 1e-5


# --------------------------------------------------------------------------- dispatcher and model


def test_triton_backend_resolution(monkeypatch):
    x = torch.zeros(1, 2, 3, device=DEV)
    assert resolve_backend("triton", x) == "triton"
    assert resolve_backend("auto", torch.zeros(1)) == "ref"  # CPU auto stays the reference
    monkeypatch.setattr(ops, "_exporting", lambda: True)
    assert resolve_backend("triton", x) == ops.EXPORT_SCAN_DEFAULT  # exporting stays on the export path


def test_triton_backend_falls_back_for_standalone_ops():
    """The standalone scan and conv have no triton kernel: they run what ``auto`` picks."""
    g = torch.Generator().manual_seed(4)
    u = torch.randn(1, 3, 6, generator=g)
    w = torch.randn(3, 4, generator=g)
    assert torch.equal(ops.causal_conv1d(u, w, backend="triton"), ops.causal_conv1d(u, w, backend="auto"))
    delta, A, B, C = torch.rand(1, 3, 6, generator=g), -torch.rand(3, 2, generator=g), torch.randn(1, 2, 6, generator=g), torch.randn(1, 2, 6, generator=g)
    assert torch.equal(ops.selective_scan(u, delta, A, B, C, backend="triton"), ops.selective_scan(u, delta, A, B, C, backend="auto"))


def test_triton_backend_unavailable_says_how(monkeypatch):
    monkeypatch.setattr(tb, "available", lambda: False)
    with pytest.raises(BackendUnavailable) as exc:
        resolve_backend("triton", torch.zeros(1, device=DEV))
    assert "pip install triton" in str(exc.value) and "\n" not in str(exc.value)
    # auto never picks an absent triton
    assert resolve_backend("auto", torch.zeros(1)) == "ref"


def test_model_on_triton_matches_ref_logits_and_grads():
    torch.manual_seed(5)
    model = create_model("vim_test", depth=2).eval().to(DEV)  # eval: no stochastic depth
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # mixers that matter next to the residual stream
        for blk in model.layers:
            m = blk.mixer
            for lin in (m.in_proj, m.out_proj, m.x_proj, m.x_proj_b):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * lin.in_features**-0.5)
    img = torch.randn(1, 3, 32, 32, generator=g).to(DEV)
    params = [p for p in model.parameters() if p.requires_grad]
    out, grads = {}, {}
    for backend in ("ref", "triton"):
        logits = set_backend(model, backend)(img)
        out[backend] = logits.detach()
        grads[backend] = torch.autograd.grad(logits.square().sum(), params)
    assert rel_err(out["triton"], out["ref"]) < 1e-5
    for (name, _), a, b in zip(model.named_parameters(), grads["triton"], grads["ref"]):
        assert rel_err(a, b) < 1e-4, name
    assert all(m.backend == "triton" for m in model.modules() if hasattr(m, "backend"))
