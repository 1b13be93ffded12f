"""Video lengths on a GPU: the Triton merge at 1569 tokens (8 frames x 196 patches + the class
token at 0) and a whole VideoMamba-Ti video model in one CUDA graph with Triton merges.

Run on a GPU machine (kernels on PYTHONPATH, see benchmarks/video_gpu.sh):
``python -m pytest -m gpu tests/test_video_gpu.py``.
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
TOKENS = 1569


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("d", [192, 384, 576])
@pytest.mark.parametrize("r", [88, 40])
def test_triton_merge_at_video_length(d, r):
    """VideoMamba-Ti/S/M widths at 1569 tokens, sizes from an earlier merge. Both sides score in
    fp32 with another summation order: a near-tie at the cut may flip one source of a clip (its
    destination and the neighbouring output tokens: a few rows of that clip); the tokens that agree
    agree to fp32 rounding."""
    assert fast.supports(ordered=True, distance="cosine", tokens=TOKENS, width=d, dtype=torch.float32)
    g = torch.Generator(device="cuda").manual_seed(d + r)
    h = torch.randn(4, TOKENS, d, device="cuda", generator=g)
    res = torch.randn(4, TOKENS, d, device="cuda", generator=g)
    size = torch.rand(4, TOKENS, 1, device="cuda", generator=g) * 3 + 0.5
    got = fast.fast_merge(h, res, size, r, 0, 0)
    want = reference(h, res, size, r, 0, 0)
    assert got[0].shape == (4, TOKENS - r, d)
    agree = (got[2] == want[2]).all(-1)
    assert int((~agree).sum(-1).max()) <= 4  # at most one flipped decision per clip
    torch.testing.assert_close(got[0][agree], want[0][agree], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1][agree], want[1][agree], rtol=1e-5, atol=1e-6)


def test_the_longest_sequence_and_one_more():
    n = fast.MAX_TOKENS
    assert fast.supports(ordered=True, distance="cosine", tokens=n, width=192, dtype=torch.float32)
    assert not fast.supports(ordered=True, distance="cosine", tokens=n + 1, width=192, dtype=torch.float32)
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(1, n, 192, device="cuda", generator=g)
    got, want = fast.fast_merge(h, h, None, 88, 0, 0), reference(h, h, None, 88, 0, 0)
    agree = (got[2] == want[2]).all(-1)
    assert int((~agree).sum(-1).max()) <= 4  # at most one flipped decision per clip
    torch.testing.assert_close(got[0][agree], want[0][agree], rtol=1e-5, atol=1e-6)


def test_video_tiny_fp16_graph_with_triton_merges():
    """VideoMamba-Ti video, 8 x 224 px, merge 88 (11 merges, 1569 -> 601 tokens): fp16 in one CUDA
    graph with Triton merges against the reference merge in fp32."""
    torch.manual_seed(0)
    gm = set_backend(convert(create_model("videomamba_video_tiny").eval(), "video-r031"), "auto").cuda()
    x = torch.randn(2, 3, 8, 224, 224, device="cuda")
    with torch.inference_mode():
        set_merge_impl(gm, "torch")
        exact = gm(x)
        gm.half()
        torch_fp16 = gm(x.half())
        set_merge_impl(gm, "auto")
        graphed = optimize_for_inference(gm)
        got = graphed(x.half())
        assert graphed.graphed_shapes == [tuple(x.shape)] and not graphed.note
    graphed.reset()
    assert _rel(got, exact) <= 2 * _rel(torch_fp16, exact) + 1e-3
