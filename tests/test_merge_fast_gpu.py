"""The inference fast path on a GPU: Triton merges at Vim-S shapes and in whole models, and the
whole forward captured in a CUDA graph (compressor.optimize_for_inference).

Run on a GPU machine (kernels from shared/ on PYTHONPATH, see docs/gpu.md):
``python -m pytest -m gpu tests/test_merge_fast_gpu.py tests/test_merge_fast.py``.
fp32: ≤1e-5 relative to the reference path. fp16: the relative budget of the reference,
``err(fast_fp16, ref_fp32) <= 2 * err(torch_fp16, ref_fp32) + eps``.
"""

from __future__ import annotations

import pytest
import torch

from compressor import convert, create_model, optimize_for_inference, set_merge_impl
from compressor.merge import fast
from compressor.models import set_backend

from test_merge_fast import reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not fast.available(), reason="needs Triton"),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("d", [192, 384, 768])
def test_vim_shapes_fp32(d):
    """Vim-Ti/S/B widths, 197 tokens with the class token in the middle, sizes from a merge."""
    g = torch.Generator(device="cuda").manual_seed(d)
    h = torch.randn(16, 197, d, device="cuda", generator=g)
    res = torch.randn(16, 197, d, device="cuda", generator=g)
    size = torch.rand(16, 197, 1, device="cuda", generator=g) * 3 + 0.5
    for prune in (False, True):
        got = fast.fast_merge(h, res, size, 11, 98, 93, prune=prune)
        want = reference(h, res, size, 11, 98, 93, prune)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_vim_shapes_low_precision(dtype):
    g = torch.Generator(device="cuda").manual_seed(1)
    h = torch.randn(32, 197, 384, device="cuda", generator=g)
    res = torch.randn(32, 197, 384, device="cuda", generator=g)
    got = fast.fast_merge(h.to(dtype), res, None, 11, 98, 93)
    want = reference(h.to(dtype), res, None, 11, 98, 93)
    exact = reference(h.to(dtype).float(), res, None, 11, 98, 93)
    assert torch.equal(got[2], want[2])  # the same tokens were merged
    assert _rel(got[0], exact[0]) <= 2 * _rel(want[0], exact[0]) + 1e-6
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def vim_s_r031():
    torch.manual_seed(0)
    model = create_model("vim_small").eval()
    gm = set_backend(convert(model, "r031"), "auto").cuda()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    return gm, x


def test_whole_model_fp32(vim_s_r031):
    gm, x = vim_s_r031
    with torch.inference_mode():
        set_merge_impl(gm, "torch")
        want = gm(x)
        set_merge_impl(gm, "triton")
        got = gm(x)
    set_merge_impl(gm, "auto")
    assert _rel(got, want) <= 1e-5


def test_whole_model_fp16_graph(vim_s_r031):
    """fp16, whole forward in a CUDA graph with Triton merges, against the reference in fp32."""
    gm, x = vim_s_r031
    with torch.inference_mode():
        set_merge_impl(gm, "torch")
        exact = gm(x)
        gm.half()
        torch_fp16 = gm(x.half())
        set_merge_impl(gm, "auto")
        graphed = optimize_for_inference(gm)
        got = graphed(x.half())
        assert graphed.graphed_shapes == [tuple(x.shape)] and not graphed.note  # captured: no host sync
        again = graphed(x.half().flip(0))  # a new input through the same graph
        eager = gm(x.half().flip(0))
    gm.float()
    graphed.reset()
    assert _rel(got, exact) <= 2 * _rel(torch_fp16, exact) + 1e-3
    assert _rel(again, eager) <= 1e-3
