"""The exported scan forms as single ops, written out by their own ONNX translations.

Why: ``torch.onnx.export`` traces, decomposes and translates every PyTorch op of the model one
at a time (milliseconds each on a 2-core CPU). Traced op by op, the ``ssd`` scan is about a
hundred ops per direction, most of the 9,000 of a depth-24 Vim and most of the export time;
the ``loop`` form has no PyTorch writing that traces to a ``Scan`` cheaply. Inside
:func:`onnx_translation`, :func:`compressor.ops.selective_scan` calls the custom ops
``rmeeto::ssd_scan`` / ``rmeeto::loop_scan`` instead: ``torch.export`` records one node per
direction and the translations below write the computation in standard ONNX ops (opset 18, no
custom domain: stock ONNX Runtime runs the file).

- :func:`ssd_scan_onnx`: the computation of :func:`selective_scan_ssd` (loop-free).
- :func:`loop_scan_onnx`: one ``Scan`` node over the tokens whose body is the recurrence of
  :func:`selective_scan_ref` (three small ops per token).
- :func:`loop_scan_reversed_onnx`: the same ``Scan`` run from the last token to the first
  (``rmeeto::loop_scan_reversed``, the backward direction of the bidirectional mixer without
  flipped copies of its inputs and output).

Each translation is tested against the sequential reference in fp32 and fp64 (the PyTorch ops'
eager implementations are the reference and the ssd form). Outside :func:`onnx_translation`
(eager, ``torch.compile``, a plain ``torch.onnx.export``) the custom ops are never used.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Optional, TypeVar

import numpy as np
import torch
from onnxscript import onnx_types
from onnxscript.onnx_opset import opset18 as op

try:
    import onnx_ir as ir
except ImportError:  # pragma: no cover - onnxscript before 0.3 carries the IR itself
    from onnxscript import ir

from ._scan_ref import selective_scan_ref
from ._scan_ssd import selective_scan_ssd, ssd_params

__all__ = ["onnx_translation", "translating", "ssd_scan_onnx", "loop_scan_onnx", "loop_scan_reversed_onnx"]

_ACTIVE = contextvars.ContextVar("rmeeto_onnx_translation", default=False)
T = TypeVar("T", onnx_types.FLOAT, onnx_types.DOUBLE, onnx_types.FLOAT16, onnx_types.BFLOAT16)
_FLOAT, _DOUBLE = 1, 11  # ONNX TensorProto data types


def _define(name: str, fn):
    """A custom op ``rmeeto::<name>`` with :func:`selective_scan_ref`'s signature running ``fn``."""

    def impl(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
             delta_softplus: bool) -> torch.Tensor:
        return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)

    impl.__name__ = name
    custom = torch.library.custom_op(f"rmeeto::{name}", mutates_args=())(impl)
    custom.register_fake(lambda u, *args: torch.empty_like(u))
    return custom


def _scan_reversed_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """:func:`selective_scan_ref` from the last token to the first: ``flip(scan(flip(...)))``
    over the per-token inputs ``u, delta, B, C, z``."""
    f = lambda t: None if t is None else t.flip(-1)  # noqa: E731
    return selective_scan_ref(f(u), f(delta), A, f(B), f(C), D, f(z), delta_bias, delta_softplus).flip(-1)


ssd_scan = _define("ssd_scan", selective_scan_ssd)
loop_scan = _define("loop_scan", selective_scan_ref)
loop_scan_reversed = _define("loop_scan_reversed", _scan_reversed_ref)
#: scan form -> the custom op recorded for it while translating
CUSTOM_OPS = {"ssd": ssd_scan, "loop": loop_scan}
#: scan form -> the custom op of its reversed scan (last token first), where the form has one
REVERSED_OPS = {"loop": loop_scan_reversed}


def translating() -> bool:
    """Inside :func:`onnx_translation`: the scan is to be recorded as one op."""
    return _ACTIVE.get()


@contextlib.contextmanager
def onnx_translation():
    """For ``torch.onnx.export(..., custom_translation_table=table)``: yields ``table`` and makes
    the ``ssd`` and ``loop`` scans export as one op each for the duration."""
    token = _ACTIVE.set(True)
    try:
        yield {torch.ops.rmeeto.ssd_scan.default: ssd_scan_onnx, torch.ops.rmeeto.loop_scan.default: loop_scan_onnx,
               torch.ops.rmeeto.loop_scan_reversed.default: loop_scan_reversed_onnx}
    finally:
        _ACTIVE.reset(token)


def _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """The shared preamble in ONNX ops: cast to the accumulation type, bias + softplus on
    delta. Returns ``(acc, const, (u, delta, A, B, C, D, z))``."""
    acc = _DOUBLE if int(u.dtype) == _DOUBLE else _FLOAT
    cast = lambda v: v if v is None or int(v.dtype) == acc else op.Cast(v, to=acc)  # noqa: E731
    u, delta, A, B, C, D, z, delta_bias = map(cast, (u, delta, A, B, C, D, z, delta_bias))
    np_acc = np.float64 if acc == _DOUBLE else np.float32
    const = lambda a: op.Constant(value=ir.tensor(np.asarray(a, dtype=np_acc)))  # noqa: E731
    if delta_bias is not None:
        delta = op.Add(delta, op.Unsqueeze(delta_bias, [1]))
    if delta_softplus:
        delta = _softplus(delta, const)
    return acc, const, (u, delta, A, B, C, D, z)


def _finish(y, u, D, z, acc: int, out_type: int):
    """The shared epilogue: ``+ D u``, gate with ``silu(z)``, cast back."""
    if D is not None:
        y = op.Add(y, op.Mul(u, op.Unsqueeze(D, [1])))
    if z is not None:
        y = op.Mul(y, op.Mul(z, op.Sigmoid(z)))
    return y if out_type == acc else op.Cast(y, to=out_type)


def ssd_scan_onnx(u: T, delta: T, A: T, B: T, C: T, D: Optional[T] = None, z: Optional[T] = None,
                  delta_bias: Optional[T] = None, delta_softplus: bool = False) -> T:
    """ONNX translation of ``rmeeto::ssd_scan`` (traced by the exporter: ``op.*`` calls become
    nodes). The computation of :func:`selective_scan_ssd`, arranged for ONNX Runtime's kernels
    and its CUDA provider: the within-chunk cumulative sums are ``CumSum`` nodes (as ``(T, T)``
    matrix products, the CUDA provider ran them as huge GEMMs with an 8-wide output, half of the
    batch-128 time: benchmarks/onnx_gpu_kernels.py), the per-chunk quantities are single steps
    of those sums, the carries run on ``(nc, ...)`` tensors (contiguous rows), softplus is
    composed from ``Exp``/``Log`` (``Softplus`` is five times slower on the CPU provider). The
    batch may be dynamic; ``d``, ``n``, ``l`` are static."""
    out_type = int(u.dtype)
    d, l, n = int(u.shape[1]), int(u.shape[2]), int(A.shape[1])  # before any Cast (its output has no shape)
    acc, const, (u, delta, A, B, C, D, z) = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    T_, K = ssd_params(torch.float64 if acc == _DOUBLE else torch.float32)
    nc, half = -(-l // T_), T_ // 2
    pad = nc * T_ - l
    x = op.Mul(delta, u)
    dl, x, Bp, Cp = ((op.Pad(t, [0, 0, 0, 0, 0, pad]) if pad else t) for t in (delta, x, B, C))
    chunked = lambda t, rows: op.Reshape(t, [0, *rows, nc, T_])  # noqa: E731  (b, ..., nc, T)
    logd = op.Max(op.Mul(chunked(dl, [d, 1]), op.Reshape(A, [1, d, n, 1, 1])), const(-K))
    last_axis = op.Constant(value_int=-1)
    at = lambda t, k: op.Slice(t, [k], [k + 1], [-1])  # noqa: E731  step k of each chunk, kept as (..., 1)
    to_carry = lambda t: op.Transpose(t, perm=[3, 4, 0, 1, 2])  # noqa: E731  (b, d, n, nc, 1) -> (nc, 1, b, d, n)
    cs = op.CumSum(logd, last_axis)  # Σ_{k≤t} P_k within each chunk
    ref = at(cs, half - 1)  # Σ_{k≤m} P_k: chunk start → reference (the last step of the first half)
    S = op.Sub(cs, ref)
    E = op.Exp(S)
    W = op.Div(op.Mul(chunked(x, [d, 1]), chunked(Bp, [1, n])), E)
    cw = op.CumSum(W, last_axis)  # cumulative sums of W within each chunk; its last step is the chunk's sum
    to_ref, rest = to_carry(ref), to_carry(op.Sub(at(cs, T_ - 1), ref))  # (nc, 1, b, d, n)
    h_in = _chunk_carries_onnx(op.Exp(op.Add(to_ref, rest)), op.Mul(op.Exp(rest), to_carry(at(cw, T_ - 1))), nc)
    G = op.Add(cw, op.Transpose(op.Mul(op.Exp(to_ref), h_in), perm=[2, 3, 4, 0, 1]))  # + the carry, (b, d, n, nc, T)
    y = op.ReduceSum(op.Mul(op.Mul(E, G), chunked(Cp, [1, n])), [2], keepdims=0)
    y = op.Reshape(y, [0, d, nc * T_])
    if pad:
        y = op.Slice(y, [0], [l], [-1])
    return _finish(y, u, D, z, acc, out_type)


def loop_scan_onnx(u: T, delta: T, A: T, B: T, C: T, D: Optional[T] = None, z: Optional[T] = None,
                   delta_bias: Optional[T] = None, delta_softplus: bool = False) -> T:
    """ONNX translation of ``rmeeto::loop_scan``: one ``Scan`` over the tokens. The decays
    ``exp(Δ_t A)`` and inputs ``Δ_t u_t B_t`` of every token are computed before the loop, as
    whole-sequence element-wise ops (``(l, b, n, d)`` each); per token the body is then only
    ``h ← decay_t ⊙ h + input_t`` and the readout ``C_t · h`` (three nodes: on ONNX Runtime a
    Scan step costs mostly per node and per iteration, not per element). Unrolling several
    tokens per iteration was measured slower on the CPU provider (Vim-Ti r031 batch 1: 223 ms
    with one token, 257 / 260 ms with 4 / 8: the Split/Concat copies cost more than the fewer
    iterations save; docs/benchmarks.md section 6).

    The state is laid out ``(n, d)``, channels last: ONNX Runtime's CPU provider broadcasts in
    runs of the innermost axis, and the two outer products above run 2-3x faster with runs of
    ``d`` (hundreds) than of ``n`` (16); the body's ops then also work on contiguous rows, and
    the readout is a ``(1, n) @ (n, d)`` product (benchmarks/onnx_cpu_profile.py)."""
    return _loop_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse=False)


def loop_scan_reversed_onnx(u: T, delta: T, A: T, B: T, C: T, D: Optional[T] = None, z: Optional[T] = None,
                            delta_bias: Optional[T] = None, delta_softplus: bool = False) -> T:
    """ONNX translation of ``rmeeto::loop_scan_reversed``: :func:`loop_scan_onnx` with the
    ``Scan`` reading its inputs and writing its outputs from the last token to the first
    (``scan_input_directions`` / ``scan_output_directions`` 1). Inputs and output stay in token order: no flipped copies (each a
    ``Slice`` with step -1 over ``(b, e, l)``) before or after."""
    return _loop_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse=True)


def _loop_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, reverse: bool):
    """:func:`loop_scan_onnx` (``reverse`` False) and :func:`loop_scan_reversed_onnx` (True)."""
    out_type = int(u.dtype)
    batch, d, l, n = u.shape[0], int(u.shape[1]), int(u.shape[2]), int(A.shape[1])  # before any Cast (its output has no shape)
    acc, const, (u, delta, A, B, C, D, z) = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    tokens_first = lambda t, axis: op.Unsqueeze(op.Transpose(t, perm=[2, 0, 1]), [axis])  # noqa: E731  (l, b, ...)
    decay = op.Exp(op.Mul(tokens_first(delta, 2), op.Transpose(A, perm=[1, 0])))  # (l, b, 1, d) x (n, d)
    inputs = op.Mul(tokens_first(op.Mul(delta, u), 2), tokens_first(B, 3))  # (l, b, 1, d) x (l, b, n, 1)
    h0 = op.ConstantOfShape(op.Concat(op.Shape(u, start=0, end=1), op.Constant(value_ints=[n, d]), axis=0),
                            value=ir.tensor(np.zeros(1, dtype=np.float64 if acc == _DOUBLE else np.float32)))
    _, ys = _call_op("Scan", h0, decay, inputs, tokens_first(C, 2), body=_loop_body(batch, d, n, acc),
                     num_scan_inputs=3, _num_outputs=2,
                     **({"scan_input_directions": [1, 1, 1], "scan_output_directions": [1]} if reverse else {}))
    y = op.Reshape(ys, [l, -1, d])  # (l, b, d)
    return _finish(op.Transpose(y, perm=[1, 2, 0]), u, D, z, acc, out_type)


def _call_op(*args, **kwargs):
    """An ONNX node with several outputs (onnxscript's ``op.Scan`` gives one): the exporter's own
    helper for its ``Scan``/``If`` translations (PyTorch 2.6 and newer)."""
    try:
        from torch.onnx._internal.exporter._torchlib.ops.hop import call_op
    except ImportError as e:  # pragma: no cover - depends on the PyTorch version
        raise NotImplementedError(f"the 'loop' export needs PyTorch 2.6 or newer ({e}): export with scan 'ssd'") from e
    return call_op(*args, **kwargs)


def _loop_body(batch, d: int, n: int, acc: int):
    """The Scan body: inputs ``h (b, n, d)``, ``decay_t (b, n, d)``, ``input_t (b, n, d)``,
    ``C_t (b, 1, n)``; outputs ``h`` and ``y_t (b, 1, d)``."""
    b = batch if isinstance(batch, int) else None
    typ = ir.TensorType(ir.DataType(acc))
    value = lambda name, *dims: ir.Value(name=name, shape=ir.Shape(list(dims)), type=typ)  # noqa: E731
    h, at, xt, ct = value("h", b, n, d), value("decay", b, n, d), value("input", b, n, d), value("c", b, 1, n)
    nodes = [ir.Node("", "Mul", [at, h], name="decayed")]
    nodes.append(ir.Node("", "Add", [nodes[-1].outputs[0], xt], name="state"))
    nodes.append(ir.Node("", "MatMul", [ct, nodes[-1].outputs[0]], name="readout"))
    state, y = nodes[1].outputs[0], nodes[2].outputs[0]
    state.name, y.name = "h_out", "y"
    state.shape, state.type, y.shape, y.type = h.shape, typ, ir.Shape([b, 1, d]), typ
    return ir.Graph([h, at, xt, ct], [state, y], nodes=nodes, name="selective_scan_step")


def _softplus(x, const):
    """``torch.nn.functional.softplus`` (threshold 20) from element-wise ops without ``Where``
    (a ternary op with a broadcast scalar takes ONNX Runtime's CPU provider several ns per
    element, ten times an ``Add``; ``Softplus`` itself is five times slower than this):
    ``max(x, log1p(exp(min(x, 20))))`` (``log(1 + e^x) > x``, so the max picks ``x`` exactly
    where torch returns ``x``), with ``log1p(y) = log(v) - (v - 1 - y) / v`` for ``v = 1 + y``:
    the rounding error ``v - 1 - y`` of the sum is exact and removed to first order (relative
    error ~eps², and ``y`` itself where ``1 + y`` rounds to 1)."""
    y = op.Exp(op.Min(x, const(20.0)))
    v = op.Add(y, const(1.0))
    log1p = op.Sub(op.Log(v), op.Div(op.Sub(op.Sub(v, const(1.0)), y), v))
    return op.Max(x, log1p)


def _chunk_carries_onnx(a, e, nc: int):
    """State entering each chunk along axis 0: ``h_0 = 0``, ``h_{c+1} = a_c ⊙ h_c + e_c``;
    sequential over the ``nc`` chunks (each step two small ops on contiguous rows)."""
    if nc == 1:
        return op.Sub(e, e)  # zeros of e's shape (e is finite)
    a_s = op.Split(a, num_outputs=nc, axis=0)
    e_s = op.Split(e, num_outputs=nc, axis=0)
    h = e_s[0]
    states = [op.Sub(h, h), h]
    for c in range(1, nc - 1):
        h = op.Add(op.Mul(a_s[c], h), e_s[c])
        states.append(h)
    return op.Concat(*states, axis=0)
