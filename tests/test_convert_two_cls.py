"""Two class tokens (hustvl/Vim's ``use_double_cls_token``: a head token at 0, a tail token at
``M + 1``, readout the mean of both), from the schedule arithmetic and the merge op up to a
converted foreign model: both tokens protected, positions per token by ``class_token_after``,
the readout's indices rewritten, a float64 loop written from the semantics, save → load, the
Triton merge refused, ONNX export and source maps."""

from __future__ import annotations

import copy

import foreign_models as fm
import foreign_ops
import pytest
import torch
from helpers import naive_merge

from compressor import load_model
from compressor.convert import FactoryRef, convert, save_compressed
from compressor.errors import BackendUnavailable
from compressor.merge import (MergeConfig, TokenMerge, class_token_after, fast, merge_ref, merge_schedule,
                              resolve_merge_impl, set_merge_impl, slot_map)

pytestmark = pytest.mark.usefixtures("one_thread")

HEAD_TAIL = (0, 17)  # 16 patches between a head and a tail class token


def images(n=2, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return fm.double_cls()


def merges(gm) -> list[TokenMerge]:
    return [m for m in gm.modules() if isinstance(m, TokenMerge)]


# --------------------------------------------------------------------------------------------
# schedule and merge op


@pytest.mark.parametrize("L,r", [(18, 3), (18, 8), (15, 5), (198, 5), (198, 98), (4, 1)])
def test_head_stays_first_and_tail_stays_last(L, r):
    assert class_token_after((0, L - 1), L, r) == (0, L - r - 1)
    assert class_token_after(0, L, r) == 0 and class_token_after(L - 1, L, r) == L - r - 1  # per token


def test_two_class_tokens_follow_the_one_token_rule_and_stay_distinct():
    for L, r in [(18, 3), (30, 7), (10, 4)]:
        for p1 in range(L - 1):
            for p2 in range(p1 + 1, L):
                q1, q2 = class_token_after((p1, p2), L, r)
                assert q1 == class_token_after(p1, L, r) and q1 < q2 < L - r
                assert q2 in (class_token_after(p2, L, r), q1 + 1)
    assert class_token_after((2, 3), 10, 4) == (1, 2)  # the rule gives 1 and 1: the second moves on


def test_schedule_caps_at_half_the_patch_tokens_and_moves_both_tokens():
    steps = merge_schedule(MergeConfig(num_prune=20, interval=1), 18, HEAD_TAIL, 4)
    assert [(s.tokens_in, s.r, s.cls_in, s.cls_out) for s in steps] == [
        (18, 8, (0, 17), (0, 9)), (10, 4, (0, 9), (0, 5)), (6, 2, (0, 5), (0, 3))]
    one = merge_schedule(MergeConfig(num_prune=20, interval=1), 17, 0, 4)
    assert [s.r for s in one] == [8, 4, 2]  # (17 - 1) // 2: one class token as before


def _naive_two(hidden, residual, size, r, cls_in, cls_out, **kw):
    """Take both class tokens out, merge the patches with the spec's loop, put them back."""
    keep = [i for i in range(len(hidden)) if i not in cls_in]
    h, res, s = naive_merge([hidden[i] for i in keep], [residual[i] for i in keep], [size[i] for i in keep], r,
                            None, **kw)
    for p, q in zip(cls_in, cls_out):
        h.insert(q, hidden[p])
        res.insert(q, residual[p])
        s.insert(q, size[p])
    return h, res, s


@pytest.mark.parametrize("cls_in,ordered,prune", [
    ((0, 20), True, False), ((0, 20), True, True), ((5, 6), True, False), ((3, 14), False, False)])
def test_merge_ref_with_two_class_tokens_equals_a_float64_loop(cls_in, ordered, prune):
    L, r, b, c = 21, 6, 2, 5
    torch.manual_seed(L + sum(cls_in))
    hidden, residual = torch.randn(b, L, c), torch.randn(b, L, c)
    size = torch.randint(1, 4, (b, L, 1)).float()
    cls_out = class_token_after(cls_in, L, r, ordered)
    h, res, new_size = merge_ref(hidden, residual, size, r, cls_in, cls_out, ordered=ordered, prune=prune)
    for i in range(b):
        eh, er, es = _naive_two(hidden[i].double().tolist(), residual[i].double().tolist(),
                                size[i, :, 0].double().tolist(), r, cls_in, cls_out, ordered=ordered, prune=prune)
        assert torch.allclose(h[i].double(), torch.tensor(eh, dtype=torch.float64), rtol=1e-5, atol=1e-6)
        assert torch.allclose(res[i].double(), torch.tensor(er, dtype=torch.float64), rtol=1e-5, atol=1e-6)
        assert new_size[i, :, 0].tolist() == es


def test_class_tokens_identical_to_patches_are_never_matched():
    """Each class token is a copy of a source patch (cosine 1, the best match there is): a merge
    that saw them would take them first; they must come back alone and unchanged."""
    torch.manual_seed(0)
    L, r = 12, 5
    hidden = torch.randn(1, L, 4)
    hidden[0, 0], hidden[0, 11] = hidden[0, 1], hidden[0, 3]
    cls_out = class_token_after((0, 11), L, r)
    slot = slot_map(hidden, r, (0, 11), cls_out)[0].tolist()
    assert slot[0] == cls_out[0] and slot[11] == cls_out[1]
    assert slot.count(cls_out[0]) == 1 and slot.count(cls_out[1]) == 1
    h, _, s = merge_ref(hidden, hidden, None, r, (0, 11), cls_out)
    assert torch.equal(h[0, list(cls_out)], hidden[0, [0, 11]]) and s[0, list(cls_out), 0].tolist() == [1.0, 1.0]


def test_triton_merge_is_refused_for_two_class_tokens_and_auto_takes_the_reference():
    h = torch.randn(1, 18, 16)
    assert not fast.supports(ordered=True, distance="cosine", tokens=18, width=16, dtype=torch.float32, class_tokens=2)
    assert fast.supports(ordered=True, distance="cosine", tokens=18, width=16, dtype=torch.float32, class_tokens=1)
    assert resolve_merge_impl("auto", h, h, cls_in=HEAD_TAIL) == "torch"
    if fast.available() and fast.interpreting():  # otherwise the first reason given is another one
        with pytest.raises(BackendUnavailable, match=r"2 class tokens.*impl 'torch' or 'auto'") as e:
            resolve_merge_impl("triton", h, h, cls_in=HEAD_TAIL)
        assert "\n" not in str(e.value)
        assert resolve_merge_impl("triton", h, h, cls_in=0) == "triton"
    if fast.available():
        with pytest.raises(ValueError, match="2 class tokens"):
            fast.fast_merge(h, h, None, 3, HEAD_TAIL, (0, 14))


# --------------------------------------------------------------------------------------------
# a converted foreign model with two class tokens


def test_discovery_finds_both_class_tokens_and_both_readouts(model):
    gm = convert(model, MergeConfig(num_prune=3))
    assert gm.layout.cls_index == HEAD_TAIL and gm.layout.num_tokens == 18 and gm.layout.grid == 4
    assert gm.layout.cls_param == "cls_token_head,cls_token_tail"
    assert [(s.layer, s.cls_in, s.cls_out) for s in gm.steps] == [(2, (0, 17), (0, 14)), (4, (0, 14), (0, 11))]
    readouts = sorted(n.meta["rmeeto_readout"] for n in gm.graph.nodes if n.meta.get("rmeeto_readout") is not None)
    assert readouts == [0, 11]
    # the token insertion is the original model's: the cat of head, patches, tail is untouched
    cats = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.cat]
    assert len(cats) == 1 and len(cats[0].args[0]) == 3


def test_noop_recipe_is_bit_identical(model):
    gm = convert(model, "none")
    x = images()
    assert merges(gm) == []
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


def _loop(model, x, cfg: MergeConfig):
    """The model in float64, merging by hand: both class tokens out, the patches merged by the
    spec's loop, the class tokens back at ``class_token_after``; the readout averages them there."""
    m = copy.deepcopy(model).double()
    h = m.patch_embed(x.double()).flatten(2).transpose(1, 2)
    b = h.shape[0]
    h = torch.cat([m.cls_token_head.expand(b, -1, -1), h, m.cls_token_tail.expand(b, -1, -1)], 1) + m.pos_embed
    hidden, residual, cls = h, None, (0, h.shape[1] - 1)
    size = [[1.0] * h.shape[1] for _ in range(b)]
    for i, layer in enumerate(m.layers):
        L, n = hidden.shape[1], hidden.shape[1] - 2
        r = min(cfg.num_prune, n // 2)
        if i > 0 and i % cfg.interval == 0 and r > 0:
            out = class_token_after(cls, L, r, cfg.ordered)
            rows = [_naive_two(hidden[j].tolist(), residual[j].tolist(), size[j], r, cls, out, ordered=cfg.ordered,
                               prune=cfg.mode == "prune") for j in range(b)]
            hidden = torch.tensor([row[0] for row in rows], dtype=torch.float64)
            residual = torch.tensor([row[1] for row in rows], dtype=torch.float64)
            size, cls = [row[2] for row in rows], out
        hidden, residual = layer(hidden, residual)
    h = foreign_ops.fused_add_rms_norm(hidden, m.norm_f_w, residual, prenorm=False)
    return m.head((h[:, cls[0]] + h[:, cls[1]]) / 2)


@pytest.mark.parametrize("cfg", [MergeConfig(num_prune=3), MergeConfig(num_prune=8),
                                 MergeConfig(num_prune=3, mode="prune"), MergeConfig(num_prune=4, ordered=False)],
                         ids=["r3", "r8", "prune", "unordered"])
def test_merged_conversion_equals_a_float64_loop(model, cfg):
    x = images(2, seed=5)
    with torch.no_grad():
        want = _loop(model, x, cfg)
        got = convert(model, cfg)(x).double()
    assert ((got - want).norm() / want.norm()) <= 1e-6


def test_class_token_rows_pass_every_merge_unmixed(model):
    """At each merge the rows at the class positions come out bit-identical to the rows that went
    in (size 1); at the first merge those rows are the unmerged model's own."""
    gm = convert(model, MergeConfig(num_prune=5))
    seen = []
    hooks = [m.register_forward_hook(lambda mod, a, out: seen.append((mod, a, out))) for m in merges(gm)]
    plain_in = []
    hook = model.layers[2].register_forward_pre_hook(lambda mod, a: plain_in.append(a))
    x = images(2, seed=3)
    with torch.no_grad():
        gm(x)
        model(x)
    for h in (*hooks, hook):
        h.remove()
    assert len(seen) == 2
    for mod, (hid, res, _), (hid2, res2, size2) in seen:
        p, q = list(mod.cls_in), list(mod.cls_out)
        assert torch.equal(hid2[:, q], hid[:, p]) and torch.equal(res2[:, q], res[:, p])
        assert size2[:, q].eq(1).all() and size2.sum(1).eq(18).all()
    _, (hid, res, _), _ = seen[0]
    assert torch.equal(hid[:, [0, 17]], plain_in[0][0][:, [0, 17]]) and torch.equal(res, plain_in[0][1])


def test_explicit_triton_on_the_converted_model_is_a_one_line_error(model):
    if not (fast.available() and fast.interpreting()):
        pytest.skip("needs Triton's CPU interpreter (TRITON_INTERPRET=1 without CUDA)")
    gm = convert(model, MergeConfig(num_prune=3))
    assert set_merge_impl(gm, "triton") == 2
    with torch.no_grad(), pytest.raises(BackendUnavailable, match="2 class tokens, the kernels protect at most one"):
        gm(images())
    set_merge_impl(gm, "auto")
    with torch.no_grad():
        assert torch.isfinite(gm(images())).all()


def test_save_load_round_trip_gives_identical_logits(model, tmp_path):
    gm = convert(model, MergeConfig(num_prune=4), factory=FactoryRef("foreign_models:double_cls"))
    with torch.no_grad():
        for p in gm.parameters():
            p.mul_(1.01)
    save_compressed(gm, tmp_path / "c.pt")
    back = load_model(tmp_path / "c.pt", factory="foreign_models:double_cls")
    assert back.layout == gm.layout and back.layout.cls_index == HEAD_TAIL and back.steps == gm.steps
    x = images()
    with torch.no_grad():
        assert torch.equal(back(x), gm.eval()(x))


def test_source_maps_drop_both_class_tokens(model):
    from compressor.merge.visualize import merge_sources

    gm = convert(model, MergeConfig(num_prune=5))
    src = merge_sources(gm.eval(), images(2))
    final = gm.steps[-1].cls_out
    assert src.shape == (2, 18 - 10, 16)
    assert src.sum(1).eq(1).all()  # merge mode: every patch in exactly one final token
    assert src[:, list(final)].eq(0).all()  # the class tokens' rows hold no patch


def test_onnx_export_takes_the_reference_merge(model, tmp_path):
    from compressor.export import export_onnx

    gm = convert(model, MergeConfig(num_prune=4))
    report = export_onnx(gm, tmp_path / "two_cls.onnx", batch=2)
    assert report.max_rel_diff <= 1e-4 and report.top1_agreement == 1.0
