"""The inference fast path on a GPU: Triton merges at Vim-S shapes and in whole models, and the
whole forward captured in a CUDA graph (compressor.optimize_for_inference).

Run on a GPU machine with the CUDA kernels on PYTHONPATH (``. benchmarks/gpu_env.sh``):
``python -m pytest -m gpu tests/test_merge_fast_gpu.py tests/test_merge_fast.py``.
fp32: ≤1e-5 relative to the reference path. fp16: the relative budget of the reference,
``err(fast_fp16, ref_fp32) <= 2 * err(torch_fp16, ref_fp32) + eps``. Decisions in low precision:
both merges score fp16/bf16 hidden states in fp32, under autocast too, and decide alike.
"""

from __future__ import annotations

import pytest
import torch

from compressor import convert, create_model, optimize_for_inference, set_merge_impl
from compressor.merge import TokenMerge, bipartite, fast, slot_map
from compressor.models import set_backend

from test_merge_fast import reference, tied_tokens

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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_scores_are_the_fp32_scores_of_the_low_precision_hidden(dtype):
    """The kernel matches on fp32 cosines of the fp16/bf16 hidden states (fp32 norms and
    accumulation, no low-precision normalisation): its best scores equal the reference's
    fp32 scores of the same tensor to fp32 rounding, and pick the same destinations."""
    g = torch.Generator(device="cuda").manual_seed(5)
    h = torch.randn(32, 197, 384, device="cuda", generator=g).to(dtype)
    best, idx = fast.best_scores(h, 98)
    want, want_idx = bipartite._scores(bipartite._drop_cls(h, 98), "cosine").max(-1)
    torch.testing.assert_close(best, want, rtol=2e-6, atol=2e-7)
    assert (idx == want_idx).float().mean() > 0.999  # a tie within fp32 rounding may go either way


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_changes_no_decision(dtype):
    """Under autocast (the official eval runs fp16 autocast, re-training bf16) the reference
    still scores in fp32: near-tied candidates decide as without autocast, and exactly tied ones
    as in the kernel."""
    g = torch.Generator(device="cuda").manual_seed(6)
    base = torch.randn(16, 4, 384, device="cuda", generator=g)
    h = base.repeat(1, 50, 1)[:, :197] + 0.01 * torch.randn(16, 197, 384, device="cuda", generator=g)  # cosines ~0.9999
    want = slot_map(h, 30, 98, 83)
    tied = tied_tokens().cuda().to(dtype)
    res = torch.randn(tied.shape, device="cuda", generator=g)
    with torch.autocast("cuda", dtype=dtype):
        assert torch.equal(slot_map(h, 30, 98, 83), want)
        assert torch.equal(fast._launch(tied, res, None, 30, 98, 83, False)[3].long(), slot_map(tied, 30, 98, 83))


def _decisions(m: TokenMerge, hidden, residual, size=None) -> torch.Tensor:
    """The slot map a merge computes on its input (the kernel's own for the triton merge)."""
    if m.impl == "triton":
        return fast._launch(hidden, residual, size, m.r, m.cls_in, m.cls_out, m.prune)[3].long()
    return slot_map(hidden, m.r, m.cls_in, m.cls_out, prune=m.prune)


@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16])
def test_whole_model_amp_decides_alike_in_both_merges(vim_s_r031, amp):
    """Vim-S r031 under autocast (fp32 weights, as the official eval): the torch and triton merges
    take the same decisions at all 11 merges, and their logits are as close to the fp32 model's
    as the reference's (the merged tokens are rounded to the autocast dtype, so one-ulp
    differences in the fp32 sums may round either way)."""
    gm, x = vim_s_r031
    set_merge_impl(gm, "torch")
    with torch.inference_mode():
        exact = gm(x)
    merges = [m for m in gm.modules() if isinstance(m, TokenMerge)]
    runs = {}
    for impl in ("torch", "triton"):
        slots = {}
        hooks = [m.register_forward_pre_hook(lambda mod, a, i=i: slots.__setitem__(i, _decisions(mod, *a)))
                 for i, m in enumerate(merges)]
        set_merge_impl(gm, impl)
        with torch.inference_mode(), torch.autocast("cuda", dtype=amp):
            runs[impl] = (gm(x).float(), slots)
        for hk in hooks:
            hk.remove()
    set_merge_impl(gm, "auto")
    assert len(runs["torch"][1]) == 11
    assert all(torch.equal(runs["torch"][1][i], runs["triton"][1][i]) for i in range(11))
    assert _rel(runs["triton"][0], exact) <= 2 * _rel(runs["torch"][0], exact) + 1e-3
