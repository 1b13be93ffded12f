"""The scan forms written for ONNX (compressor.ops._scan_ssd, _scan_onnx): the loop-free ``ssd``
form in PyTorch and both ONNX translations (``ssd``, ``loop``) against the sequential reference,
in fp32 (≤ 1e-5 relative) and fp64 (≤ 1e-10), with decays that underflow, odd lengths, a
dynamic batch and fp16 inputs; the size of what one direction exports to. The mixer's backward
direction as exported (a ``Scan`` run last token first, an anti-causal conv, the directions
gated once) against the flipped reference."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import compressor.ops as ops
from compressor.export._graph import light_optimize
from helpers import negative_step_slices
from compressor.ops import selective_scan_ref, selective_scan_ssd
from compressor.ops._scan_ssd import ssd_params

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
TOL = {torch.float32: 1e-5, F64: 1e-10}


def rel_err(a, ref) -> float:
    a, ref = torch.as_tensor(a).double(), torch.as_tensor(ref).double()
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def scan_args(b, d, n, l, dtype, seed=0, delta_scale=1.0):
    """Positional scan inputs ``(u, delta, A, B, C, D, z, delta_bias)``; raw delta (softplus on)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    args = (r(b, d, l), r(b, d, l) * delta_scale - 1.0, -torch.exp(r(d, n)), r(b, n, l), r(b, n, l), r(d), r(b, d, l), r(d) * 0.5)
    return tuple(t.to(dtype) for t in args)


# --------------------------------------------------------------------------- ssd in PyTorch


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("length", [1, 7, 8, 9, 17, 64, 197])
def test_ssd_matches_ref(dtype, length):
    args = scan_args(2, 5, 4, length, dtype, seed=length)
    want = selective_scan_ref(*args, delta_softplus=True)
    got = selective_scan_ssd(*args, delta_softplus=True)
    assert got.dtype == dtype and got.shape == want.shape
    assert rel_err(got, want) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_ssd_decays_far_beyond_the_float_range_stay_exact(dtype):
    """Large Δ and |A|: some chunks decay by over a thousand nats (e^-1000 underflows
    any float); the per-step clamp keeps every exponent in range and the result matches."""
    args = scan_args(2, 6, 8, 50, dtype, seed=3, delta_scale=40.0)
    T, K = ssd_params(dtype)
    raw = torch.nn.functional.softplus(args[1].double() + args[7].double()[:, None])
    assert (raw[..., :T].sum(-1) * args[2].double().abs().max()).max() > 1000
    got = selective_scan_ssd(*args, delta_softplus=True)
    assert torch.isfinite(got).all()
    assert rel_err(got, selective_scan_ref(*args, delta_softplus=True)) <= TOL[dtype]


def test_ssd_gradients_match_ref():
    args = [t.requires_grad_() for t in scan_args(1, 3, 4, 19, F64, seed=5)]
    grads = []
    for fn in (selective_scan_ref, selective_scan_ssd):
        out = fn(*args, delta_softplus=True)
        grads.append(torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), dtype=F64).view_as(out)).sum(), args))
    for g_ssd, g_ref in zip(grads[1], grads[0]):
        assert rel_err(g_ssd, g_ref) <= 1e-9


def test_ssd_without_optional_inputs():
    u, delta, A, B, C, *_ = scan_args(1, 3, 2, 12, F64, seed=6)
    delta = delta.abs() + 0.1
    assert rel_err(selective_scan_ssd(u, delta, A, B, C), selective_scan_ref(u, delta, A, B, C)) <= 1e-10


# --------------------------------------------------------------------------- ONNX translations


class _Direction(torch.nn.Module):
    """One scan direction through the dispatcher, parameters as a Mamba mixer holds them."""

    def __init__(self, A, D, bias, form):
        super().__init__()
        self.A, self.D, self.bias, self.form = torch.nn.Parameter(A), torch.nn.Parameter(D), torch.nn.Parameter(bias), form

    def forward(self, u, delta, B, C, z):
        return ops.selective_scan(u, delta, self.A, B, C, self.D, z, delta_bias=self.bias, delta_softplus=True, backend=self.form)


def _export_direction(form, args, path, dynamic=False):
    u, delta, A, B, C, D, z, bias = args
    module = _Direction(A, D, bias, form).to(u.dtype if u.dtype != torch.float16 else torch.float32)
    names = ["u", "delta", "B", "C", "z"]
    dyn = {k: {0: torch.export.Dim("batch")} for k in names} if dynamic else None
    with torch.no_grad(), ops.onnx_translation() as table:
        program = torch.onnx.export(module, (u, delta, B, C, z), dynamo=True, custom_translation_table=table, optimize=False,
                                    input_names=names, dynamic_shapes=dyn, verify=False, report=False, verbose=False)
    light_optimize(program.model)
    program.save(path)
    return onnx.load(str(path))


def _run(path, args):
    u, delta, _, B, C, _, z, _ = args
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.numpy() for k, v in zip(["u", "delta", "B", "C", "z"], (u, delta, B, C, z))})[0]


@pytest.mark.parametrize("form", ["ssd", "loop"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_onnx_translation_matches_ref(form, dtype, tmp_path):
    args = scan_args(2, 6, 4, 21, dtype, seed=7, delta_scale=10.0)
    model = _export_direction(form, args, tmp_path / "scan.onnx")
    ops_used = Counter(n.op_type for n in model.graph.node)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"} and not model.functions
    assert not ops_used.keys() & {"If", "Loop"}
    assert ops_used["Scan"] == (1 if form == "loop" else 0), ops_used
    got = _run(tmp_path / "scan.onnx", args)
    assert got.dtype == (np.float64 if dtype == F64 else np.float32)
    want = selective_scan_ref(*args[:5], args[5], args[6], args[7], True)
    assert rel_err(got, want) <= TOL[dtype]


def _flipped_ref(u, delta, A, B, C, D, z, bias):
    """The backward direction as the model computes it eagerly: flip, scan, flip back."""
    f = lambda t: t.flip(-1)  # noqa: E731
    return selective_scan_ref(f(u), f(delta), A, f(B), f(C), D, f(z), bias, True).flip(-1)


class _Reversed(_Direction):
    def forward(self, u, delta, B, C, z):
        return ops._scan_onnx.loop_scan_reversed(u, delta, self.A, B, C, self.D, z, self.bias, True)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_reversed_loop_translation_matches_flipped_ref(dtype, tmp_path):
    """One Scan with both directions 1; no flipped copy (Slice step -1) in the file."""
    args = scan_args(2, 6, 4, 21, dtype, seed=12, delta_scale=10.0)
    u, delta, A, B, C, D, z, bias = args
    module = _Reversed(A, D, bias, "loop").to(dtype).eval()
    with torch.no_grad(), ops.onnx_translation() as table:
        program = torch.onnx.export(module, (u, delta, B, C, z), dynamo=True, custom_translation_table=table, optimize=False,
                                    input_names=["u", "delta", "B", "C", "z"], verify=False, report=False, verbose=False)
    light_optimize(program.model)
    program.save(tmp_path / "rev.onnx")
    model = onnx.load(str(tmp_path / "rev.onnx"))
    scans = [n for n in model.graph.node if n.op_type == "Scan"]
    assert len(scans) == 1
    attrs = {a.name: list(a.ints) for a in scans[0].attribute if a.name.startswith("scan_")}
    assert attrs == {"scan_input_directions": [1, 1, 1], "scan_output_directions": [1]}
    assert negative_step_slices(model) == 0
    want = _flipped_ref(*args)
    assert rel_err(module(u, delta, B, C, z), want) <= TOL[dtype]  # the op's eager form (what torch.export runs)
    assert rel_err(_run(tmp_path / "rev.onnx", args), want) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_anticausal_conv_is_the_flipped_causal_conv(dtype):
    g = torch.Generator().manual_seed(13)
    x, w, b = (torch.randn(*s, generator=g, dtype=F64).to(dtype) for s in ((2, 5, 11), (5, 4), (5,)))
    want = ops.causal_conv1d_ref(x.flip(-1), w, b, "silu").flip(-1)
    assert rel_err(ops._anticausal_conv1d_export(x, w, b, "silu"), want) <= TOL[dtype]
    short = x[..., :2]  # fewer tokens than the kernel
    assert rel_err(ops._anticausal_conv1d_export(short, w, b), ops.causal_conv1d_ref(short.flip(-1), w, b).flip(-1)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_unflipped_mixer_matches_the_reference(dtype):
    """What an export records (the custom ops' eager forms: the sequential scan, reversed) against
    the mixer the model runs, fp32 and fp64, gated once, with and without ``divide_out``."""
    g = torch.Generator().manual_seed(14)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64).to(dtype) * 0.5  # noqa: E731
    e, dm, n, rank, l = 6, 4, 3, 2, 13
    dirs = [ops.Direction(r(e, 4), r(e), r(rank + 2 * n, e), r(rank, e).T.contiguous(), r(e), r(e, n), r(e)) for _ in range(2)]
    h, w_in = r(2, l, dm), r(2 * e, dm)
    scan_onnx = ops._scan_onnx
    for divide_out in (True, False):
        want = ops.bimamba_inner_ref(h, w_in, *dirs, divide_out, "ref")
        got = ops.bimamba_inner_unflipped(h, w_in, *dirs, divide_out, ops.causal_conv1d_ref, ops._anticausal_conv1d_export,
                                          scan_onnx.loop_scan, scan_onnx.loop_scan_reversed)
        assert got.shape == want.shape and got.dtype == dtype
        assert rel_err(got, want) <= TOL[dtype]


@pytest.mark.parametrize("form", ["ssd", "loop"])
def test_onnx_translation_dynamic_batch_and_fp16(form, tmp_path):
    args = scan_args(2, 4, 3, 13, torch.float32, seed=8)
    _export_direction(form, args, tmp_path / "dyn.onnx", dynamic=True)
    for b in (1, 3):
        other = scan_args(b, 4, 3, 13, torch.float32, seed=9 + b)
        other = (*other[:2], args[2], *other[3:5], args[5], other[6], args[7])  # same parameters
        assert rel_err(_run(tmp_path / "dyn.onnx", other), selective_scan_ref(*other, True)) <= 1e-5
    half = tuple(t.half() if i in (0, 1, 3, 4, 6) else t for i, t in enumerate(args))
    model = _export_direction(form, half, tmp_path / "half.onnx")
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    got = _run(tmp_path / "half.onnx", half)
    want32 = selective_scan_ref(*(t.float() for t in half[:7]), half[7], True)
    assert got.dtype == np.float16 and rel_err(got, want32) <= 2e-3  # fp32 inside, one rounding to fp16 at the end


def test_one_direction_is_one_op_while_exporting():
    """Inside onnx_translation the traced program holds one node per scan, not the ~100 ops of
    the PyTorch form (what makes the export of a depth-24 model take seconds, not minutes)."""
    args = scan_args(1, 4, 3, 30, torch.float32)
    module = _Direction(args[2], args[5], args[7], "ssd")
    inputs = (args[0], args[1], args[3], args[4], args[6])
    with ops.onnx_translation():
        traced = torch.export.export(module, inputs)
    calls = [n for n in traced.graph.nodes if n.op == "call_function"]
    assert [str(n.target) for n in calls].count("rmeeto.ssd_scan.default") == 1 and len(calls) <= 3
    outside = torch.export.export(module, inputs)  # outside the context: the PyTorch form, op by op
    assert sum(n.op == "call_function" for n in outside.graph.nodes) > 40


@pytest.mark.parametrize("form,bound", [("ssd", 60 + 2 * 25), ("loop", 40)])
def test_translation_size(form, bound, tmp_path):
    """Nodes for one direction of 197 tokens. ssd: ~55 ops on whole tensors (softplus alone is
    ten) plus two per chunk for the sequential carries (25 chunks of 8); loop: one Scan (its
    body unrolled over a chunk of tokens) and under forty around it (softplus, padding to whole
    chunks, layout, the D and z terms)."""
    args = scan_args(1, 8, 4, 197, torch.float32)
    model = _export_direction(form, args, tmp_path / "size.onnx")
    assert len(model.graph.node) <= bound, Counter(n.op_type for n in model.graph.node)
