"""The fast merge (three Triton kernels, compressor.merge.fast) against the reference merge.

Without CUDA the kernels run on Triton's CPU interpreter (tests/conftest.py sets it), so the
same kernel code is checked here and, with real kernels, in tests/test_merge_fast_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

from compressor import convert, create_model, optimize_for_inference, set_merge_impl
from compressor.inference import GraphedModel
from compressor.merge import TokenMerge, fast
from compressor.merge.schedule import MergeConfig, MergeStep

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not fast.available(), reason="needs Triton"),
    pytest.mark.skipif(not torch.cuda.is_available() and not fast.interpreting(),
                       reason="needs CUDA or TRITON_INTERPRET=1 (set by conftest without CUDA)"),
]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def reference(hidden, residual, size, r, cls_in, cls_out, prune=False):
    """TokenMerge's reference path (impl "torch") for one merge of ``r`` tokens."""
    step = MergeStep(layer=0, tokens_in=hidden.shape[1], r=r, cls_in=cls_in, cls_out=cls_out)
    merge = TokenMerge(step, MergeConfig(mode="prune" if prune else "merge", num_prune=r))
    merge.impl = "torch"
    return merge(hidden, residual, size)


CASES = [  # b, L, d, r, cls_in, cls_out, prune, with sizes
    (2, 17, 32, 3, 8, 6, False, False),  # class token in the middle (Vim), first merge
    (2, 17, 32, 3, None, None, False, True),  # no class token
    (3, 65, 48, 11, 32, 26, False, True),  # CIFAR-like
    (2, 65, 48, 11, 32, 26, True, True),  # prune
    (2, 66, 40, 9, 0, 0, False, True),  # class token first (VideoMamba), odd patch count
    (1, 30, 24, 14, 29, 15, False, True),  # class token last, r = every source
    (2, 20, 16, 0, 10, 10, False, True),  # r = 0 is the identity
]


@pytest.mark.parametrize("b,L,d,r,cls_in,cls_out,prune,sized", CASES)
def test_fast_merge_equals_reference_fp32(b, L, d, r, cls_in, cls_out, prune, sized):
    g = torch.Generator().manual_seed(L * 7 + r)
    h = torch.randn(b, L, d, generator=g).to(DEV)
    res = torch.randn(b, L, d, generator=g).to(DEV)
    size = (torch.rand(b, L, 1, generator=g) * 3 + 0.5).to(DEV) if sized else None
    got = fast.fast_merge(h, res, size, r, cls_in, cls_out, prune=prune)
    want = reference(h, res, size, r, cls_in, cls_out, prune)
    for a, e in zip(got, want):
        assert a.shape == e.shape and a.dtype == e.dtype
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fast_merge_low_precision_hidden_fp32_residual(dtype):
    """Vim keeps the residual in fp32 while hidden states are fp16/bf16: dtypes are kept, the
    same tokens are merged (sizes equal exactly), values within one rounding of the output."""
    g = torch.Generator().manual_seed(3)
    b, L, d = 2, 197, 64
    h = torch.randn(b, L, d, generator=g).to(DEV, dtype)
    res = torch.randn(b, L, d, generator=g).to(DEV)
    size = (torch.rand(b, L, 1, generator=g) + 0.5).to(DEV)
    got = fast.fast_merge(h, res, size, 11, 98, 90)
    want = reference(h, res, size, 11, 98, 90)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    eps = torch.finfo(dtype).eps
    assert ((got[0].float() - want[0].float()).abs() <= eps * want[0].float().abs() + 1e-6).all()


def test_known_answer_with_class_token():
    """Hand-made: 8 patches + a class token at 4. Source 1 (patch 2) is a copy of destination 2
    (patch 5) and source 3 (patch 6) is nearly destination 3 (patch 7); all else orthogonal. r=2
    merges exactly those two pairs; tokens keep their order and the class token lands at 3."""
    e = torch.eye(16)
    patches = torch.stack([e[0], e[1], e[2] + e[9], e[3], e[4], e[2] + e[9], e[5] + 0.1 * e[6], e[5]])
    h = torch.cat([patches[:4], e[15:16] * 5, patches[4:]]).unsqueeze(0).to(DEV)  # cls at position 4
    res = torch.arange(9.0).repeat_interleave(16).reshape(1, 9, 16).to(DEV)
    hid, resid, size = fast.fast_merge(h, res, None, 2, 4, 3)
    # patches kept: 0, 1, 3, 4(dst 2 = patch 5 absorbs patch 2), 7(dst 3 absorbs patch 6) -> positions
    # patch -> position: 0,1,2,3 -> 0..3 ; 4..7 -> 5..8
    assert size.shape == (1, 7, 1)
    # output order: patch0, patch1, patch3, cls, patch4, patch5(+patch2), patch7(+patch6)
    assert size.flatten().tolist() == [1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0]
    assert resid[0, :, 0].tolist() == [0.0, 1.0, 3.0, 4.0, 5.0, (2.0 + 6.0) / 2, (7.0 + 8.0) / 2]
    torch.testing.assert_close(hid[0, 3], h[0, 4])  # the class token, untouched


def test_ties_break_to_the_lower_index():
    """Identical tokens give equal scores: the earlier source goes first, deterministically."""
    h = torch.randn(1, 1, 8).expand(1, 12, 8).contiguous().to(DEV)  # every score is 1
    res = torch.arange(12.0).reshape(1, 12, 1).expand(1, 12, 8).contiguous().to(DEV)
    _, resid, size = fast.fast_merge(h, res, None, 2, None, None)
    # sources 0 and 1 (patches 0 and 2) go to destination 0 (patch 1, first of the equal scores)
    assert size.flatten().tolist() == [3.0] + [1.0] * 9
    assert resid[0, 0, 0].item() == pytest.approx((0 + 1 + 2) / 3)
    again = fast.fast_merge(h, res, None, 2, None, None)
    assert torch.equal(again[1], resid)


def test_out_of_range_r_is_refused():
    h = torch.randn(1, 9, 16, device=DEV)
    with pytest.raises(ValueError, match="at most 4"):
        fast.fast_merge(h, h, None, 5, 4, 3)


@pytest.fixture(scope="module")
def converted():
    torch.manual_seed(0)
    model = create_model("vim_tiny", embed_dim=32, img_size=224, num_classes=5).eval()
    return convert(model, "r031").to(DEV), torch.randn(1, 3, 224, 224).to(DEV)


def test_whole_model_triton_equals_torch(converted):
    """Vim depth 24, 197 tokens, r031 (11 merges): logits of the triton and torch merges."""
    gm, x = converted
    assert set_merge_impl(gm, "torch") == 11
    with torch.no_grad():
        want = gm(x)
        set_merge_impl(gm, "triton")
        got = gm(x)
    set_merge_impl(gm, "auto")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_auto_picks_triton_only_where_it_applies(converted):
    gm, _ = converted
    m = next(mod for mod in gm.modules() if isinstance(mod, TokenMerge))
    h = torch.randn(1, m.tokens_in, 32, device=DEV)
    assert m.impl == "auto"
    assert m._use_fast(h, h) == (DEV == "cuda")  # CPU: the reference, never the interpreter
    hg = h.clone().requires_grad_()
    assert not m._use_fast(hg, h)  # training needs autograd: the reference
    with pytest.raises(ValueError, match="choose from"):
        set_merge_impl(gm, "fastest")
    step = MergeStep(layer=2, r=2, tokens_in=17, cls_in=8, cls_out=7)
    unordered = TokenMerge(step, MergeConfig(num_prune=2, ordered=False))
    unordered.impl = "triton"
    with pytest.raises(ValueError, match="does not support"):
        unordered(torch.randn(1, 17, 8, device=DEV), torch.randn(1, 17, 8, device=DEV))


def test_failed_capture_is_not_listed_as_graphed(monkeypatch):
    """A capture that fails falls back to eager; ``graphed_shapes`` lists only captured shapes
    (a fake CUDA tensor reaches the capture path without a GPU)."""
    import compressor.inference as inference
    from torch._subclasses.fake_tensor import FakeTensorMode

    def fail(*_a, **_k):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(inference, "capture_graph", fail)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    graphed = GraphedModel(torch.nn.Identity())
    with FakeTensorMode():
        x = torch.empty(2, 3, device="cuda")
    assert graphed._entry(x) is None and "capture failed" in graphed.note and "not permitted" in graphed.note
    assert graphed.graphed_shapes == []
    assert graphed._entry(x) is None  # remembered: not captured again


def test_optimize_for_inference_cpu_falls_back_to_eager():
    torch.manual_seed(0)
    model = create_model("vim_test").eval()
    x = torch.randn(2, 3, 32, 32)
    fast_model = optimize_for_inference(model)
    assert isinstance(fast_model, GraphedModel)
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(fast_model(x), want, rtol=0, atol=0)
    assert "CUDA" in fast_model.note and not fast_model.graphed_shapes
    assert optimize_for_inference(model, mode="eager") is model
    with pytest.raises(Exception, match="unknown inference mode"):
        optimize_for_inference(model, mode="turbo")
