"""The ``triton`` backend of :func:`compressor.ops.bimamba_inner`: launchers and autograd.

Channel-last throughout (``(b, l, channels)``, as ``F.linear`` produces and consumes them), so
no transposes and no flipped copies. Forward, per mixer:

1. ``in_proj`` (cuBLAS) → ``xz: (b, l, 2e)``.
2. ``conv_fwd_kernel``: both directions' depthwise conv + bias + SiLU from one read of ``x``
   → ``xc: (2, b, l, e)``, the backward direction's already in token order.
3. ``x_proj``, ``dt_proj`` of each direction (cuBLAS) → ``xdbl: (b, l, r + 2n)``, ``Δ: (b, l, e)``.
4. ``scan_fwd_kernel``: one program set per direction (the backward one reads the sequence
   backwards), with the skip ``D``, ``Δ`` bias + softplus, the ``silu(z)`` gate and the ``1/2`` of
   ``divide_out``; fp32 state and accumulation for fp16/bf16/fp32 inputs. The two gated halves
   are added after the kernel → ``y: (b, l, e)``.

Backward (:class:`BiMambaInnerFn`): ``scan_bwd_kernel`` (one launch per direction; each segment recomputes its
states from the state saved at its start), the projections' gradients with cuBLAS, then
``conv_bwd_kernel``. On a CPU the same kernels run in Triton's interpreter when
``TRITON_INTERPRET=1`` was set before Triton was imported (the test suite does so without CUDA).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

try:  # Triton ships with torch's Linux wheels; elsewhere the backend is simply absent
    import triton
except ImportError:  # pragma: no cover - depends on the platform
    triton = None

__all__ = ["available", "interpreting", "bimamba_inner_triton", "TUNING", "scan_config"]

#: Launch parameters (``benchmarks/triton_mixer_gpu.py --sections tune`` times alternatives; these
#: were fastest on an H200). Scan: ``bd`` channels per program (one per thread, ``bd // 32``
#: warps), ``u`` steps per loop iteration (their loads issued together); the forward saves the
#: states every ``save_every`` steps for the backward, which recomputes each segment and walks it
#: back ``ub`` steps at a time (``ub: 2``: Vim-S r031 re-training 869 against 799 img/s with ``ub: 1``,
#: ``benchmarks/retrain_ab_gpu.py``). ``*_small``
#: applies when the large tile would give fewer than ``small_below`` programs. A forward tile may
#: set ``pf: 1`` (the next ``u`` steps' loads issued an iteration early, for the latency-bound
#: batch-1 grid) and ``ts``: an inference scan cut into up to that many pieces of the sequence
#: (:func:`time_splits`, while the grid has fewer than ``split_programs`` programs), since the
#: batch-1 scan otherwise walks 197 steps one after the other on a GPU that is idle. Vim-S
#: batch 1 scan (197 tokens, H200, in a CUDA graph): 82.8 us as ``32x4``, 71.8 us with ``pf``,
#: 26.6 us with ``ts: 8``, 25.9 us with both. ``ts: 16`` (10 pieces for Vim-S at batch 1, whose
#: 48 programs cap it at 512 // 48; 16 for Vim-Ti): plain Vim-S batch 1 1.201 ms against 1.282
#: with ``ts: 8``, Vim-Ti 1.190 against 1.254, merged and sliced models unchanged or faster
#: (``benchmarks/b1_graph.py``, one graph per process).
TUNING = {
    "scan": {"bd": 32, "u": 2},
    "scan_small": {"bd": 32, "u": 4, "pf": 1, "ts": 16},
    "scan_bwd": {"bd": 32, "ub": 2},
    "scan_bwd_small": {"bd": 32, "ub": 2},
    "save_every": 16,
    "small_below": 264,
    "split_programs": 512,
    "conv": {"bl": 16, "bd": 128, "warps": 4},
}


def available() -> bool:
    """Triton imports (kernels run on CUDA, or interpreted on the CPU)."""
    return triton is not None


def interpreting() -> bool:
    """Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` before import)."""
    return triton is not None and bool(triton.knobs.runtime.interpret)


@functools.lru_cache(maxsize=1)
def _kernels():
    from . import _triton_conv_kernels as ck
    from . import _triton_scan_kernels as sk

    # the unit channel stride stays a run-time value: see scan_fwd_kernel's docstring
    keep = ["s_1"]
    return {
        "conv_fwd": triton.jit(ck.conv_fwd_kernel),
        "conv_bwd": triton.jit(ck.conv_bwd_kernel),
        "scan_fwd": triton.jit(sk.scan_fwd_kernel, do_not_specialize=keep),
        "scan_bwd": triton.jit(sk.scan_bwd_kernel, do_not_specialize=keep),
    }


def scan_config(kind: str, b: int, e: int) -> dict:
    """The scan tile for ``b`` images of ``e`` channels (``kind``: ``scan`` or ``scan_bwd``): the
    large tile unless it leaves the GPU short of programs."""
    cfg = TUNING[kind]
    if b * triton.cdiv(e, cfg["bd"]) < TUNING["small_below"]:
        cfg = TUNING[kind + "_small"]
    return cfg


def _vector(n: int, itemsize: int, k: int, r: int) -> int:
    """States per vector load of B/C: 16 bytes, limited by ``n`` and by the alignment of the
    x_proj rows (``k`` columns, B at column ``r``)."""
    v = 16 // itemsize
    while v > 1 and (n % v or k % v or r % v):
        v //= 2
    return v


def _bias_or_weight(bias, weight):
    """A pointer the kernel never reads when there is no bias."""
    return bias if bias is not None else weight


def conv_fwd(x, fwd, bwd):
    """``x: (b, l, e)`` (channels contiguous) → ``(2, b, l, e)``: silu(conv) of each direction."""
    b, l, e = x.shape
    w = fwd.conv_weight.shape[-1]
    out = torch.empty(2, b, l, e, device=x.device, dtype=x.dtype)
    cfg = TUNING["conv"]
    grid = (b, triton.cdiv(l, cfg["bl"]), triton.cdiv(e, cfg["bd"]))
    _kernels()["conv_fwd"][grid](
        x, fwd.conv_weight, _bias_or_weight(fwd.conv_bias, fwd.conv_weight), bwd.conv_weight,
        _bias_or_weight(bwd.conv_bias, bwd.conv_weight), out, l, e, x.stride(0), x.stride(1), out.stride(0),
        HAS_BIAS=fwd.conv_bias is not None, W=w, BL=cfg["bl"], BD=cfg["bd"], num_warps=cfg["warps"],
    )
    return out


def conv_bwd(x, fwd, bwd, g, dx):
    """Gradients of :func:`conv_fwd`: writes ``dx`` (a ``(b, l, e)`` view, channels contiguous)
    and returns fp32 ``(dw_f, db_f, dw_b, db_b)`` (biases None when absent)."""
    b, l, e = x.shape
    w = fwd.conv_weight.shape[-1]
    cfg = TUNING["conv"]
    grid = (b, triton.cdiv(l, cfg["bl"]), triton.cdiv(e, cfg["bd"]))
    part = torch.empty(b * grid[1], 2, e, w + 1, device=x.device, dtype=torch.float32)
    _kernels()["conv_bwd"][grid](
        x, fwd.conv_weight, _bias_or_weight(fwd.conv_bias, fwd.conv_weight), bwd.conv_weight,
        _bias_or_weight(bwd.conv_bias, bwd.conv_weight), g, dx, part, l, e, x.stride(0), x.stride(1),
        g.stride(0), dx.stride(0), dx.stride(1),
        HAS_BIAS=fwd.conv_bias is not None, W=w, BL=cfg["bl"], BD=cfg["bd"], num_warps=cfg["warps"],
    )
    s = part.sum(0)  # (2, e, w + 1)
    has_bias = fwd.conv_bias is not None
    return s[0, :, :w], s[0, :, w] if has_bias else None, s[1, :, :w], s[1, :, w] if has_bias else None


def _scan_common(xc, xdbl, fwd, kind):
    _, b, l, e = xc.shape
    n = fwd.A_log.shape[1]
    k = xdbl.shape[-1]
    r = k - 2 * n
    cfg = scan_config(kind, b, e)
    consts = dict(N=n, NB=_vector(n, xdbl.element_size(), k, r), K=k, R=r, BD=cfg["bd"],
                  S=TUNING["save_every"], num_warps=max(1, cfg["bd"] // 32))
    return b, l, e, n, cfg, (b, triton.cdiv(e, cfg["bd"])), consts


#: Added to every element offset between two tensors (the kernel subtracts it): Triton types an
#: integer argument ``i32`` below 2**31 and ``i64`` above, and each type is a kernel compiled of
#: its own. The distance between two allocations moves with the allocator, so without the bias a
#: training run met new combinations late and compiled them mid-run (measured on an H200: merged
#: re-training 470 img/s instead of 800 in short runs, 21 scan variants instead of 7). A multiple
#: of 16, so the alignment Triton infers from the offset is kept.
OFFSET_BIAS = 1 << 40


def _offset(a: torch.Tensor, b: torch.Tensor) -> int:
    """Elements from ``a``'s first element to ``b``'s (the kernels reach the backward direction's
    tensor from the forward one's pointer), plus :data:`OFFSET_BIAS` (always an ``i64``)."""
    if a.dtype != b.dtype:
        raise ValueError(f"bimamba_inner: both directions' tensors must share a dtype, got {a.dtype} and {b.dtype}")
    diff = b.data_ptr() - a.data_ptr()
    if diff % a.element_size():
        raise ValueError("bimamba_inner: misaligned parameter views")  # pragma: no cover - views of one storage
    return diff // a.element_size() + OFFSET_BIAS


def time_splits(cfg: dict, programs: int, l: int, u: int) -> tuple[int, int]:
    """``(pieces, steps per piece)`` of each direction's sequence for an inference scan of
    ``programs`` programs: the tile's ``ts`` (at most), fewer when the grid is already large
    enough (:data:`TUNING` ``split_programs``); pieces are whole multiples of ``u`` steps."""
    ts = max(1, min(int(cfg.get("ts", 1)), TUNING["split_programs"] // max(programs, 1)))
    cl = triton.cdiv(triton.cdiv(l, ts), u) * u
    return triton.cdiv(l, cl), cl


def scan_fwd(xc, delta_f, delta_b, xdbl_f, xdbl_b, z, fwd, bwd, scale, save: bool):
    """Both scans, gated, as two program sets of one launch; their sum is ``y``. ``xc: (2, b, l, e)``,
    ``delta_*: (b, l, e)`` and ``xdbl_*: (b, l, r + 2n)`` contiguous, ``z: (b, l, e)`` (channels
    contiguous) → ``y: (b, l, e)``; with ``save`` also both directions' pre-gate outputs
    ``(2, b, l, e)`` and fp32 states every ``TUNING["save_every"]`` steps, ``(2, b, e, segments, n)``.
    Without ``save``, a small grid may cut the sequence into pieces (:func:`time_splits`): a first
    launch finds each piece's end state, the second runs all pieces at once."""
    b, l, e, n, cfg, grid, consts = _scan_common(xc, xdbl_f, fwd, "scan")
    u = math.gcd(cfg["u"], consts["S"])
    ts, cl = (1, triton.cdiv(l, u) * u) if save else time_splits(cfg, 2 * grid[0] * grid[1], l, u)
    y2 = torch.empty(2, b, l, e, device=xc.device, dtype=xc.dtype)
    psum = torch.empty_like(y2) if save else y2
    segs = triton.cdiv(l, consts["S"])
    hs = torch.empty(2, b, e, segs, n, device=xc.device, dtype=torch.float32) if save else y2
    hc = torch.empty(2 * b * e * (ts - 1) * (n + 1), device=xc.device, dtype=torch.float32) if ts > 1 else y2
    args = (xc, delta_f, xdbl_f, fwd.A_log, fwd.D, fwd.dt_proj_bias, z, y2, psum, hs, hc,
            xc.stride(0), _offset(delta_f, delta_b), _offset(xdbl_f, xdbl_b), _offset(fwd.A_log, bwd.A_log),
            _offset(fwd.D, bwd.D), _offset(fwd.dt_proj_bias, bwd.dt_proj_bias), y2.stride(0), hs.stride(0) if save else 0,
            l, e, cl // u, cl, xc.stride(1), xc.stride(2), z.stride(0), z.stride(1), y2.stride(1), y2.stride(2),
            1, fwd.A_log.stride(0), scale)
    kw = dict(STORE_PSUM=save, STORE_STATES=save, U=u, PF=int(cfg.get("pf", 0)), TS=ts, **consts)
    if ts > 1:  # the pieces' end states first
        _kernels()["scan_fwd"][(*grid, 2 * (ts - 1))](*args, MODE=1, **kw)
    _kernels()["scan_fwd"][(*grid, 2 * ts)](*args, MODE=0, **kw)
    return torch.add(y2[0], y2[1]), psum, hs


def scan_bwd(xc, delta_f, delta_b, xdbl_f, xdbl_b, z, fwd, bwd, scale, psum, hs, dy, dz):
    """Backward of :func:`scan_fwd`, one launch per direction (independent given ``psum``).
    Writes ``dz`` (a view); returns ``du, dΔ: (2, b, l, e)`` in ``xc``'s dtype,
    ``dbc: (2, b, l, 2n)`` fp32 and fp32 sums over images of ``dA: (2, e, n)``, ``dD, dbias: (2, e)``."""
    b, l, e, n, cfg, grid, consts = _scan_common(xc, xdbl_f, fwd, "scan_bwd")
    segs = hs.shape[3]
    if segs != triton.cdiv(l, consts["S"]):  # pragma: no cover - TUNING changed between forward and backward
        raise RuntimeError("the saved states do not match TUNING['save_every']")
    du = torch.empty_like(xc)
    ddt = torch.empty_like(xc)
    dbc = torch.zeros(2, b, l, 2 * n, device=xc.device, dtype=torch.float32)
    dA = torch.empty(2, b, e, n, device=xc.device, dtype=torch.float32)
    dD = torch.empty(2, b, e, device=xc.device, dtype=torch.float32)
    dbias = torch.empty_like(dD)
    scratch = torch.empty(grid[0] * grid[1] * (consts["S"] + 1) * n * cfg["bd"], device=xc.device, dtype=torch.float32)
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    for i, (p, delta, xdbl) in enumerate(((fwd, delta_f, xdbl_f), (bwd, delta_b, xdbl_b))):
        _kernels()["scan_bwd"][grid](
            xc[i], delta, xdbl, p.A_log, p.D, p.dt_proj_bias, z, psum[0], hs[i], dy, scratch,
            du[i], ddt[i], dz, dbc[i], dA[i], dD[i], dbias[i],
            l, e, segs, xc.stride(1), xc.stride(2), z.stride(0), z.stride(1), psum.stride(1), psum.stride(2),
            dz.stride(0), dz.stride(1), 1, p.A_log.stride(0), psum.stride(0), scale, REVERSE=i == 1, GATE=i == 0,
            UB=math.gcd(cfg.get("ub", 1), consts["S"]), **consts,
        )
    return du, ddt, dbc, dA.sum(1), dD.sum(1), dbias.sum(1)


def _forward(h, w_in, fwd, bwd, divide_out: bool, save: bool):
    """``h: (b, l, d)`` → ``y: (b, l, e)`` and what the backward needs."""
    xz = F.linear(h, w_in)  # (b, l, 2e)
    e = xz.shape[-1] // 2
    x, z = xz[..., :e], xz[..., e:]
    xc = conv_fwd(x, fwd, bwd)
    r = fwd.dt_proj_weight.shape[1]
    xdbl_f = F.linear(xc[0], fwd.x_proj_weight)  # (b, l, r + 2n)
    xdbl_b = F.linear(xc[1], bwd.x_proj_weight)
    delta_f = F.linear(xdbl_f[..., :r], fwd.dt_proj_weight)  # (b, l, e); bias added in the scan
    delta_b = F.linear(xdbl_b[..., :r], bwd.dt_proj_weight)
    scale = 0.5 if divide_out else 1.0
    y, psum, hs = scan_fwd(xc, delta_f, delta_b, xdbl_f, xdbl_b, z, fwd, bwd, scale, save)
    return y, (xz, xc, xdbl_f, xdbl_b, delta_f, delta_b, psum, hs, scale)


def check_inputs(h, w_in, fwd, bwd):
    """Device and layout requirements of the triton path (raises ``ValueError``)."""
    if h.device.type != "cuda" and not interpreting():
        raise ValueError("the triton backend runs on CUDA tensors (or on the CPU with TRITON_INTERPRET=1 set before import)")
    for p in (fwd, bwd):
        for name in ("conv_weight", "x_proj_weight", "dt_proj_weight", "A_log", "D", "dt_proj_bias"):
            t = getattr(p, name)
            if not t.is_contiguous():
                raise ValueError(f"bimamba_inner: {name} must be contiguous")


def bimamba_inner_triton(h, w_in, fwd, bwd, divide_out: bool = True):
    """Same contract as :func:`compressor.ops._bimamba.bimamba_inner_ref`."""
    check_inputs(h, w_in, fwd, bwd)
    leaves = (h, w_in, *fwd, *bwd)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in leaves):
        return BiMambaInnerFn.apply(divide_out, h, w_in, *fwd, *bwd)
    return _forward(h, w_in, fwd, bwd, divide_out, save=False)[0]


class BiMambaInnerFn(torch.autograd.Function):
    """Autograd of the triton path (the mixer minus ``out_proj``)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, divide_out, h, w_in, *params):
        from ._bimamba import Direction

        fwd, bwd = Direction(*params[:7]), Direction(*params[7:])
        y, saved = _forward(h, w_in, fwd, bwd, divide_out, save=True)
        xz, xc, xdbl_f, xdbl_b, delta_f, delta_b, psum, hs, scale = saved
        ctx.scale, ctx.has_conv_bias = scale, params[1] is not None
        ctx.save_for_backward(h, w_in, xz, xc, xdbl_f, xdbl_b, delta_f, delta_b, psum, hs,
                              *(p if p is not None else h.new_empty(0) for p in params))
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        from ._bimamba import Direction

        h, w_in, xz, xc, xdbl_f, xdbl_b, delta_f, delta_b, psum, hs, *params = ctx.saved_tensors
        if not ctx.has_conv_bias:
            params[1] = params[8] = None
        fwd, bwd = Direction(*params[:7]), Direction(*params[7:])
        e = xz.shape[-1] // 2
        dxz = torch.empty_like(xz)
        du, ddt, dbc, dA, dD, dbias = scan_bwd(xc, delta_f, delta_b, xdbl_f, xdbl_b, xz[..., e:], fwd, bwd, ctx.scale,
                                               psum, hs, dy, dxz[..., e:])
        grads = []
        dxc = du
        for i, (p, xdbl, delta) in enumerate(((fwd, xdbl_f, delta_f), (bwd, xdbl_b, delta_b))):
            r = p.dt_proj_weight.shape[1]
            ddelta = ddt[i]
            d_dt = ddelta @ p.dt_proj_weight.to(ddelta.dtype)  # (b, l, r)
            dxdbl = torch.cat([d_dt, dbc[i].to(d_dt.dtype)], dim=-1)  # (b, l, r + 2n)
            dw_dt = ddelta.reshape(-1, e).t() @ xdbl[..., :r].reshape(-1, r)
            dw_x = dxdbl.reshape(-1, dxdbl.shape[-1]).t() @ xc[i].reshape(-1, e)
            dxc[i] += dxdbl @ p.x_proj_weight.to(dxdbl.dtype)
            A = -torch.exp(p.A_log.float())
            grads.append([dw_x, dw_dt, dbias[i], dA[i] * A, dD[i]])
        dwf, dbf, dwb, dbb = conv_bwd(xz[..., :e], fwd, bwd, dxc, dxz[..., :e])
        dw_in = dxz.reshape(-1, 2 * e).t() @ h.reshape(-1, h.shape[-1]).to(dxz.dtype)
        dh = dxz @ w_in.to(dxz.dtype)
        out = [dh.to(h.dtype), dw_in.to(w_in.dtype)]
        for p, (dw_x, dw_dt, db_dt, dA_log, dD_), (dw, db) in zip((fwd, bwd), grads, ((dwf, dbf), (dwb, dbb))):
            out += [dw.to(p.conv_weight.dtype), None if db is None else db.to(p.conv_bias.dtype),
                    dw_x.to(p.x_proj_weight.dtype), dw_dt.to(p.dt_proj_weight.dtype), db_dt.to(p.dt_proj_bias.dtype),
                    dA_log.to(p.A_log.dtype), dD_.to(p.D.dtype)]
        return (None, *out)
