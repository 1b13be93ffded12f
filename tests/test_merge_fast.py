"""The fast merge (three Triton kernels, compressor.merge.fast) against the reference merge.

Without CUDA the kernels run on Triton's CPU interpreter (tests/conftest.py sets it), so the
same kernel code is checked here and, with real kernels, in tests/test_merge_fast_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

from compressor import convert, create_model, optimize_for_inference, set_merge_impl
from compressor.errors import BackendUnavailable
from compressor.inference import GraphedModel
from compressor.merge import TokenMerge, fast, merge_ref, resolve_merge_impl, slot_map
from compressor.merge.schedule import MergeConfig, MergeStep

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not fast.available(), reason="needs Triton"),
    pytest.mark.skipif(not torch.cuda.is_available() and not fast.interpreting(),
                       reason="needs CUDA or TRITON_INTERPRET=1 (set by conftest without CUDA)"),
]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def reference(hidden, residual, size, r, cls_in, cls_out, prune=False):
    """The reference merge (what TokenMerge runs with impl "torch") for one merge of ``r`` tokens."""
    return merge_ref(hidden, residual, size, r, cls_in, cls_out, prune=prune)


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


def tied_tokens(b: int = 2, L: int = 197, d: int = 16, seed: int = 0) -> torch.Tensor:
    """Integer-valued tokens (dot products exact in fp32 in any order, so both paths compute the
    very same scores) with two constant regions and several duplicated tokens: many exact ties,
    among sources' best scores and among destinations of one source."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(-3, 4, (b, L, d), generator=g).float()
    h[:, 10:41] = h[:, 10:11].clone()  # a flat background region
    h[:, 120:151] = h[:, 150:151].clone()  # another one, past the class token
    for a, c in [(50, 77), (51, 181), (60, 61), (90, 100), (3, 196), (97, 99)]:
        h[:, c] = h[:, a]
    h[:, 160:166] = 0.0  # zero tokens: cosine 0 with everything, never 0/0
    return h


@pytest.mark.parametrize("r,prune,sized,dtype", [
    (11, False, False, torch.float32),  # Vim r031's first merge
    (98, False, True, torch.float32),  # every source goes
    (40, True, True, torch.float32),  # prune
    (60, False, True, torch.float16),
])
def test_ties_give_the_same_assignment_in_both_paths(r, prune, sized, dtype):
    """Exact parity on tied inputs: the slot maps, token sizes and merged values are equal to the
    last bit (lower source index first among equal best scores, lower destination among equal
    candidates, in the reference's stable sort as in the kernel's rank)."""
    L, cls_in = 197, 98
    cls_out = (cls_in * (L - r)) // L
    h = tied_tokens().to(DEV, dtype)
    res = tied_tokens(seed=1).to(DEV)
    size = torch.randint(1, 5, (2, L, 1), generator=torch.Generator().manual_seed(2)).float().to(DEV) if sized else None
    *got, got_slot = fast._launch(h, res, size, r, cls_in, cls_out, prune)  # what fast_merge returns, and its map
    assert torch.equal(got_slot.long(), slot_map(h, r, cls_in, cls_out, prune=prune))
    want = reference(h, res, size, r, cls_in, cls_out, prune)
    for a, e in zip(got, want):
        assert a.dtype == e.dtype and torch.equal(a, e)
    sizes = got[2].flatten(1)
    assert sizes.max() > 2 or prune  # ties really decided several merges into one destination


def test_ties_follow_the_index_order_of_the_spec():
    """Every token equal: every score ties. The first ``r`` sources (patches 0, 2, ...) go, all into
    the first destination (patch 1), identically in both paths."""
    h = torch.randn(1, 1, 8).expand(1, 12, 8).contiguous().to(DEV)
    res = torch.arange(12.0).reshape(1, 12, 1).expand(1, 12, 8).contiguous().to(DEV)
    for hid, resid, size in (fast.fast_merge(h, res, None, 2, None, None), reference(h, res, None, 2, None, None)):
        assert size.flatten().tolist() == [3.0] + [1.0] * 9
        assert resid[0, 0, 0].item() == pytest.approx((0 + 1 + 2) / 3)


def test_zero_and_nan_tokens_behave_the_same_in_both_paths():
    """A zero token scores 0 (norm clamped, no 0/0 NaN); a NaN score counts as -inf, so a NaN
    source ranks last and a NaN destination is never anyone's best match. Both paths agree."""
    g = torch.Generator().manual_seed(5)
    L, d = 33, 16
    h = torch.randn(2, L, d, generator=g)
    h[0, 4] = 0.0  # a zero source (patch 4, a source)
    h[0, 5] = 0.0  # a zero destination
    h[1, 6] = float("nan")  # a NaN source
    h[1, 7] = float("nan")  # a NaN destination
    h[1, 9, 3] = float("nan")  # one NaN channel is enough to make every score of a token NaN
    h, res = h.to(DEV), torch.randn(2, L, d, generator=g).to(DEV)
    for r in (5, 16):
        want_slot = slot_map(h, r)
        *got, got_slot = fast._launch(h, res, None, r, None, None, False)
        assert torch.equal(got_slot.long(), want_slot)
        want = reference(h, res, None, r, None, None)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6, equal_nan=True)
        assert torch.isfinite(got[0][0]).all()  # the zero tokens made no NaN
        nan_src = want_slot[1, 6].item()
        assert (want_slot[1] == nan_src).sum() == 1 or r == 16  # kept alone unless every source goes
        assert (want_slot[1] == want_slot[1, 7]).sum() == 1 and (want_slot[1] == want_slot[1, 9]).sum() == 1


@pytest.mark.parametrize("prune,sized", [(False, True), (True, False)])
def test_gradients_equal_the_reference(prune, sized):
    """The kernel path with inputs that need gradients: same outputs, same gradients (hidden,
    residual and sizes) as autograd through the reference."""
    g = torch.Generator().manual_seed(9)
    b, L, d, r = 2, 33, 16, 7
    leaves = [torch.randn(b, L, d, generator=g), torch.randn(b, L, d, generator=g)]
    if sized:
        leaves.append(torch.rand(b, L, 1, generator=g) * 2 + 0.5)
    weights = [torch.randn(b, L - r, k, generator=g).to(DEV) for k in (d, d, 1)]

    def run(fn):
        ins = [t.to(DEV).requires_grad_() for t in leaves]
        outs = fn(ins[0], ins[1], ins[2] if sized else None, r, 16, 12, prune=prune)
        loss = sum((o * w).sum() for o, w in zip(outs, weights) if o.requires_grad)
        loss.backward()
        return outs, [t.grad for t in ins]

    (got, got_grads), (want, want_grads) = run(fast.fast_merge), run(merge_ref)
    assert all(o.requires_grad for o in got[:2])
    for a, e in zip(got + tuple(got_grads), want + tuple(want_grads)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_unsupported_dtypes_and_sizes_are_refused():
    assert fast.supports(ordered=True, distance="cosine", tokens=197, width=384, dtype=torch.bfloat16,
                         residual_dtype=torch.float32)
    assert not fast.supports(ordered=True, distance="cosine", tokens=197, width=384, dtype=torch.float64)
    assert not fast.supports(ordered=True, distance="cosine", tokens=197, width=384, dtype=torch.float16,
                             residual_dtype=torch.float64)
    assert not fast.supports(ordered=True, distance="cosine", tokens=fast.MAX_TOKENS + 1, width=8, dtype=torch.float32)
    assert not fast.supports(ordered=True, distance="cosine", tokens=9, width=fast.MAX_WIDTH + 1, dtype=torch.float32)
    h = torch.randn(1, 9, 16, dtype=torch.float64, device=DEV)
    with pytest.raises(ValueError, match="float64"):
        fast.fast_merge(h, h, None, 2, 4, 3)
    with pytest.raises(BackendUnavailable, match="float64.*impl 'torch'"):
        resolve_merge_impl("triton", h, h)
    assert resolve_merge_impl("auto", h, h) == "torch"


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
    assert resolve_merge_impl(m.impl, h, h) == ("triton" if DEV == "cuda" else "torch")  # CPU: never the interpreter
    hg = h.clone().requires_grad_()
    assert resolve_merge_impl(m.impl, hg, h) == "torch"  # training stays on the reference
    assert resolve_merge_impl("triton", hg, h) == "triton"  # asked for: it has a backward
    with pytest.raises(ValueError, match="choose from"):
        set_merge_impl(gm, "fastest")
    with pytest.raises(BackendUnavailable, match="choose one of"):
        resolve_merge_impl("fastest", h, h)
    step = MergeStep(layer=2, r=2, tokens_in=17, cls_in=8, cls_out=7)
    unordered = TokenMerge(step, MergeConfig(num_prune=2, ordered=False))
    unordered.impl = "triton"
    with pytest.raises(BackendUnavailable, match="ordered cosine"):
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
