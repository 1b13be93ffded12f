"""The Triton scan kernel's launch signature and generated code, checked without a GPU.

The forward scan reaches the backward direction's tensors through element offsets between two
allocations. Triton compiles one kernel per argument signature (an int below 2**31 is ``i32``,
above it ``i64``; an int divisible by 16 is marked so), so those offsets must have one type
whatever the allocator does, and must keep their divisibility so that the B/C rows are still
loaded as vectors. The kernel is compiled for sm_90 here (Triton's code generation runs on the
CPU) and its PTX is compared with and without that divisibility.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from compressor.ops import _triton_bimamba as tb  # noqa: E402
from triton.runtime.jit import mangle_type  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("distance_elems", [0, 256, -256, 2**31 + 256, -(2**31) - 256, 2**36])
def test_offset_argument_type_is_fixed(distance_elems):
    """Whatever the distance between the two tensors, the kernel sees an ``i64`` divisible by 16
    when the distance is (one compiled kernel, vector loads kept)."""

    class Fake:  # a tensor-like with a chosen address (only what _offset reads)
        def __init__(self, ptr):
            self.ptr, self.dtype = ptr, torch.float16

        def data_ptr(self):
            return self.ptr

        def element_size(self):
            return 2

    base = 1 << 34
    off = tb._offset(Fake(base), Fake(base + 2 * distance_elems))
    assert off - tb.OFFSET_BIAS == distance_elems
    assert mangle_type(off) == "i64"
    assert (off % 16 == 0) == (distance_elems % 16 == 0)


_COMPILE = textwrap.dedent("""
    import json, re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as tcompile
    from compressor.ops import _triton_bimamba as tb, _triton_scan_kernels as sk

    fn = triton.jit(sk.scan_fwd_kernel, do_not_specialize=["s_1"])
    base = dict(STORE_PSUM=False, STORE_STATES=True, N=16, NB=8, K=56, R=24, BD=32, U=4, S=16, PF=0, TS=1, MODE=0)
    offsets = ("o_dt", "o_bc", "o_alog", "o_dskip", "o_bias")
    aligned = {"o_u", "o_y", "s_ub", "s_zb", "s_yb", "s_zl", "s_yl", "s_ul", "E", "s_an"}
    out = {}
    variants = {"True pf0": (True, {}), "False pf0": (False, {}), "True pf1": (True, dict(PF=1)),
                "split ends": (True, dict(STORE_STATES=False, TS=4, MODE=1)),
                "split pieces": (True, dict(STORE_STATES=False, TS=4, MODE=0))}
    for name, (divisible, extra) in variants.items():
        const = dict(base, **extra)
        sig, attrs = {}, {}
        for i, a in enumerate(fn.arg_names):
            if a in const:
                sig[a] = "constexpr"
            elif a.endswith("_ptr"):
                sig[a], attrs[(i,)] = ("*fp32" if a in ("hs_ptr", "hc_ptr") else "*fp16"), [["tt.divisibility", 16]]
            elif a == "scale":
                sig[a] = "fp32"
            elif a in offsets:
                sig[a] = "i64"  # what tb._offset always gives
                if divisible:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                sig[a] = "i32"
                if a in aligned:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn, sig, {(fn.arg_names.index(k),): v for k, v in const.items()}, attrs)
        try:
            ptx = tcompile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 1}).asm["ptx"]
        except Exception as e:
            msg = str(e)
            if "ptxas" in msg.lower() or "backend" in msg.lower():  # no NVIDIA tool chain on this machine
                print(json.dumps({"skip": msg.splitlines()[0][:200]}))
                sys.exit(0)
            raise  # a compile error of the kernel itself fails the test
        out[name] = len(re.findall(r"ld\\.global[.\\w]*\\.v[248]", ptx))
    print(json.dumps(out))
""")


def test_scan_kernel_compiles_for_sm90_with_vector_loads():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, not interpret
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in res:
        pytest.skip(f"Triton cannot generate sm_90 code here: {res['skip']}")
    assert res["True pf0"] > 0, "the biased i64 offsets lost their divisibility: B/C rows are no longer vector loads"
    assert res["False pf0"] < res["True pf0"]  # the check can tell: without divisibility the loads are scalar
    assert res["True pf1"] >= res["True pf0"]  # the prefetching variant compiles and keeps its vector loads
    # the time-split passes (inference at small grids) compile, their B/C rows still vector loads
    assert res["split ends"] > 0 and res["split pieces"] >= res["True pf0"]


def test_kernel_subtracts_the_launchers_bias():
    from compressor.ops import _triton_scan_kernels as sk

    assert getattr(sk.OFFSET_BIAS, "value", sk.OFFSET_BIAS) == tb.OFFSET_BIAS
    assert tb.OFFSET_BIAS % 16 == 0 and tb.OFFSET_BIAS >= 2**31
