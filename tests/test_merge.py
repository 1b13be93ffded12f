"""The merge op on hand-made inputs with known answers, and against a naive float64 loop written
from the spec (docs: rmeeto-spec.md), independently of the library."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import naive_merge

from compressor.merge import (
    MergeConfig,
    MergeStep,
    TokenMerge,
    class_token_after,
    match,
    merge_schedule,
    merge_source,
    merge_wavg,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def one_hot(L: int, b: int = 1) -> torch.Tensor:
    """``(b, L, L)`` identity: row ``i`` = original token ``i``."""
    return torch.eye(L).expand(b, L, L).clone()


def members(source: torch.Tensor) -> list[list[int]]:
    """Original indices each output token holds (batch 0)."""
    return [torch.nonzero(row).flatten().tolist() for row in source[0]]


def orthogonal(L: int) -> torch.Tensor:
    """``(1, L, L)``: every token a distinct basis vector (all cosines 0)."""
    return torch.eye(L).unsqueeze(0).clone()


def step(L: int, r: int, cls: int | None, ordered: bool = True) -> MergeStep:
    return MergeStep(layer=2, tokens_in=L, r=r, cls_in=cls, cls_out=class_token_after(cls, L, r, ordered))


# --------------------------------------------------------------------------------------------
# hand-made inputs


def test_identical_pair_merges_first():
    L = 10
    metric = orthogonal(L)
    metric[0, 4] = metric[0, 5]  # source at even position 4 == destination right after it
    out = members(merge_source(match(metric, 1), one_hot(L)))
    assert out == [[0], [1], [2], [3], [4, 5], [6], [7], [8], [9]]


def test_identical_pair_merges_first_around_the_class_token():
    L, cls = 11, 5  # patches 0..9 are tokens 0..4, 6..10
    metric = orthogonal(L)
    metric[0, 7] = metric[0, 8]  # patch positions 6 (source) and 7 (destination)
    merge = match(metric, 1, cls, class_token_after(cls, L, 1))
    out = members(merge_source(merge, one_hot(L)))
    # the class token moves to (5 * 10) // 11 = 4, ahead of token 4
    assert out == [[0], [1], [2], [3], [5], [4], [6], [7, 8], [9], [10]]


def _kept_identity(groups: list[list[int]]) -> list[int]:
    """The token that was kept for each output (patch indexing, no class token): the destination
    (odd index) if the group has one, else the lone unmerged source."""
    ids = []
    for g in groups:
        odd = [i for i in g if i % 2 == 1]
        assert len(odd) <= 1 and (odd or len(g) == 1), g
        ids.append(odd[0] if odd else g[0])
    return ids


@pytest.mark.parametrize("L,r", [(12, 1), (12, 5), (13, 6), (40, 11)])
def test_ordered_merge_keeps_the_original_order(L, r):
    torch.manual_seed(L + r)
    merge = match(torch.randn(1, L, 8), r)
    groups = members(merge_source(merge, one_hot(L)))
    assert len(groups) == L - r
    kept = _kept_identity(groups)
    assert kept == sorted(kept) and len(set(kept)) == L - r
    merged_sources = sorted(set(range(L)) - set(kept))
    assert len(merged_sources) == r and all(i % 2 == 0 for i in merged_sources)


def test_sizes_sum_to_the_token_count_and_count_members():
    torch.manual_seed(0)
    L, cls = 33, 16
    hidden = torch.randn(2, L, 8)
    tm = TokenMerge(step(L, 9, cls), MergeConfig(num_prune=9))
    _, _, size = tm(hidden, torch.randn(2, L, 8))
    source = merge_source(tm.match(hidden), one_hot(L, 2))
    assert size.shape == (2, L - 9, 1)
    assert torch.equal(size.sum(dim=1).flatten(), torch.full((2,), float(L)))
    assert torch.equal(size[..., 0], source.sum(dim=-1))
    assert size.max() > 1  # something was really merged


def test_size_weighted_mean_is_exact_over_two_merges():
    # merge 1: tokens 0, 1, 2 point the same way; sources 0 and 2 both go into destination 1
    L = 8
    metric = orthogonal(L)
    metric[0, 0] = metric[0, 2] = metric[0, 1]
    x = torch.tensor([0.0, 3.0, 6.0, 10.0, 20.0, 30.0, 40.0, 50.0]).view(1, L, 1)
    merge = match(metric, 2)
    x1, size1 = merge_wavg(merge, x, torch.ones(1, L, 1))
    assert size1.flatten().tolist() == [3, 1, 1, 1, 1, 1]
    assert x1.flatten().tolist() == [3.0, 10.0, 20.0, 30.0, 40.0, 50.0]
    # merge 2: the 3-token group (source 0) joins original token 3 (destination 1): weights 3:1
    metric2 = orthogonal(6)
    metric2[0, 0] = metric2[0, 1]
    x2, size2 = merge_wavg(match(metric2, 1), x1, size1)
    assert size2.flatten().tolist() == [4, 1, 1, 1, 1]
    assert x2[0, 0, 0].item() == (3 * 3.0 + 1 * 10.0) / 4 == (0 + 3 + 6 + 10) / 4
    assert x2.flatten()[1:].tolist() == [20.0, 30.0, 40.0, 50.0]


def test_token_merge_weights_residual_by_the_same_sizes():
    L = 8
    metric = orthogonal(L)
    metric[0, 0] = metric[0, 2] = metric[0, 1]
    tm = TokenMerge(MergeStep(2, L, 2, None, None), MergeConfig(num_prune=2))
    residual = (torch.arange(L, dtype=torch.float32) * 2).view(1, L, 1).expand(1, L, L).contiguous()
    size = torch.tensor([1.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]).view(1, L, 1)
    h, res, new_size = tm(metric, residual, size)
    assert new_size.flatten().tolist() == [4, 1, 1, 1, 1, 1]
    assert torch.all(res[0, 0] == (1 * 0 + 2 * 2 + 1 * 4) / 4)
    assert res[0, 1:, 0].tolist() == [6.0, 8.0, 10.0, 12.0, 14.0]
    assert torch.allclose(h[0, 0], (metric[0, 0] + 2 * metric[0, 1] + metric[0, 2]) / 4)


@pytest.mark.parametrize("L,cls,r", [(17, 8, 8), (17, 0, 5), (197, 98, 11), (197, 98, 50), (197, 98, 98), (9, 8, 4)])
def test_class_token_never_merges_and_lands_at_the_formula(L, cls, r):
    torch.manual_seed(L * r)
    metric = torch.randn(1, L, 8)
    metric[0, cls] = metric[0, cls + 1 if cls + 1 < L else cls - 1]  # identical to a neighbour
    cls_out = (cls * (L - r)) // L
    tm = TokenMerge(step(L, r, cls), MergeConfig(num_prune=r))
    assert tm.cls_out == cls_out
    groups = members(merge_source(tm.match(metric), one_hot(L)))
    assert groups[cls_out] == [cls]
    assert sum(g.count(cls) for g in groups) == 1
    h, res, size = tm(metric, torch.randn(1, L, 8))
    assert size[0, cls_out, 0].item() == 1
    assert torch.equal(h[0, cls_out], metric[0, cls])


def test_class_token_positions_of_the_spec_examples():
    assert [class_token_after(98, 197, r) for r in (1, 5, 11, 50, 98)] == [97, 95, 92, 73, 49]


def test_prune_drops_sources_and_keeps_the_rest_bit_exact():
    torch.manual_seed(1)
    L, cls, r = 21, 10, 6
    hidden, residual = torch.randn(2, L, 16), torch.randn(2, L, 16)
    tm = TokenMerge(step(L, r, cls), MergeConfig(mode="prune", num_prune=r))
    h, res, size = tm(hidden, residual)
    assert torch.equal(size, torch.ones(2, L - r, 1))
    source = merge_source(tm.match(hidden), one_hot(L, 2))
    assert torch.equal(source.sum(-1), torch.ones(2, L - r))  # each output holds exactly one token
    kept = source.argmax(-1)  # (2, L - r)
    cls_out = (cls * (L - r)) // L
    assert (kept[:, cls_out] == cls).all()
    patches_kept = torch.cat([kept[:, :cls_out], kept[:, cls_out + 1 :]], dim=1)
    assert (patches_kept.diff(dim=1) > 0).all()  # ordered (the class token moves by the formula)
    assert torch.equal(h, hidden.gather(1, kept.unsqueeze(-1).expand(-1, -1, 16)))
    assert torch.equal(res, residual.gather(1, kept.unsqueeze(-1).expand(-1, -1, 16)))
    dropped = sorted(set(range(L)) - set(kept[0].tolist()))
    patch = [i - (i > cls) for i in dropped]
    assert len(dropped) == r and cls not in dropped and all(p % 2 == 0 for p in patch)


def test_unordered_layout_and_class_token_position():
    torch.manual_seed(2)
    L, cls, r = 17, 8, 3
    n_src = math.ceil((L - 1) / 2)
    cls_out = (cls * (n_src - r)) // n_src
    assert class_token_after(cls, L, r, ordered=False) == cls_out
    metric = torch.randn(1, L, 8)
    merge = match(metric, r, cls, cls_out, ordered=False)
    groups = members(merge_source(merge, one_hot(L)))
    assert groups[cls_out] == [cls]
    patches = [[i - (i > cls) for i in g] for k, g in enumerate(groups) if k != cls_out]
    # expected: unmerged sources by descending best cosine, then all destinations in order
    m = torch.cat([metric[0, :cls], metric[0, cls + 1 :]]).double()
    m = m / m.norm(dim=-1, keepdim=True)
    best = (m[0::2] @ m[1::2].T).max(-1).values
    by_score = [2 * int(i) for i in best.argsort(descending=True)]
    unmerged = by_score[r:]
    assert [g for g in patches[: n_src - r]] == [[i] for i in unmerged]
    assert [max(i for i in g if i % 2 == 1) for g in patches[n_src - r :]] == list(range(1, L - 1, 2))
    assert sorted(i for g in patches for i in g) == list(range(L - 1))


@pytest.mark.parametrize("distance,p", [("l1", 1), ("l2", 2)])
def test_distances_pick_the_nearest(distance, p):
    # hand-made: source 4 is a slightly perturbed copy of destination 7, all else orthogonal
    L = 10
    metric = orthogonal(L)
    metric[0, 4] = metric[0, 7] + 0.05 * metric[0, 9]
    groups = members(merge_source(match(metric, 1, distance=distance), one_hot(L)))
    assert [4, 7] in groups and len(groups) == L - 1
    # random: with every source merged, each one joins its nearest destination
    torch.manual_seed(3)
    L = 15
    metric = torch.randn(1, L, 6)
    n_src = (L + 1) // 2
    groups = members(merge_source(match(metric, n_src, distance=distance), one_hot(L)))
    m = metric[0].double() / metric[0].double().norm(dim=-1, keepdim=True)
    nearest = torch.cdist(m[0::2], m[1::2], p=p).argmin(-1)
    for s, d in enumerate(nearest.tolist()):
        assert any(2 * s in g and 2 * d + 1 in g for g in groups), (s, d)


def test_r_is_capped_at_half_the_patches():
    cfg = MergeConfig(num_prune=1000, interval=2)
    steps = merge_schedule(cfg, 197, 98, 24)
    assert steps[0].r == (197 - 1) // 2 == 98
    assert all(s.r == (s.tokens_in - 1) // 2 for s in steps)
    assert [s.tokens_in for s in steps[:3]] == [197, 99, 50]
    assert merge_schedule(cfg, 16, None, 4)[0].r == 8  # without a class token: every destination
    tm = TokenMerge(steps[0], cfg)
    h, _, size = tm(torch.randn(1, 197, 8), torch.randn(1, 197, 8))
    assert h.shape == (1, 99, 8) and size.sum().item() == 197


def test_zero_r_schedule_is_empty_and_token_counts_match_the_spec():
    assert merge_schedule(MergeConfig(num_prune=0), 197, 98, 24) == []
    steps = merge_schedule(MergeConfig(num_prune=11), 197, 98, 24)
    assert [s.layer for s in steps] == list(range(2, 24, 2))
    assert [s.tokens_out for s in steps][-1] == 76 and steps[-1].cls_out == 34
    ti = merge_schedule(MergeConfig(num_prune=5, final_tokens=76), 197, 98, 24)
    assert [s.tokens_out for s in ti][-2:] == [147, 76] and ti[-1].cls_out == 35


# --------------------------------------------------------------------------------------------
# a naive float64 re-implementation of the spec, token by token


@pytest.mark.parametrize(
    "L,r,cls,ordered,prune",
    [
        (17, 8, 8, True, False),  # middle, capped r
        (17, 3, 0, True, False),  # head
        (16, 5, None, True, False),  # mean pooling
        (65, 11, 32, True, False),
        (64, 20, None, True, False),
        (33, 7, 16, False, False),  # unordered
        (33, 7, 0, True, True),  # prune
    ],
)
def test_token_merge_equals_a_naive_float64_loop(L, r, cls, ordered, prune):
    torch.manual_seed(1000 * L + r)
    b, c = 2, 6
    hidden, residual = torch.randn(b, L, c), torch.randn(b, L, c)
    size = torch.randint(1, 5, (b, L, 1)).float()
    cfg = MergeConfig(num_prune=r, ordered=ordered, mode="prune" if prune else "merge")
    tm = TokenMerge(step(L, r, cls, ordered), cfg)
    h, res, new_size = tm(hidden, residual, size)
    for i in range(b):
        eh, er, es = naive_merge(
            hidden[i].double().tolist(), residual[i].double().tolist(), size[i, :, 0].double().tolist(), r, cls,
            ordered=ordered, prune=prune,
        )
        assert torch.allclose(h[i].double(), torch.tensor(eh, dtype=torch.float64), rtol=1e-5, atol=1e-6)
        assert torch.allclose(res[i].double(), torch.tensor(er, dtype=torch.float64), rtol=1e-5, atol=1e-6)
        assert new_size[i, :, 0].tolist() == es


# --------------------------------------------------------------------------------------------
# source tracking through a converted model


@pytest.mark.parametrize("mode", ["merge", "prune"])
def test_merge_sources_partition_the_patches(mode):
    from compressor.convert import convert
    from compressor.merge.visualize import merge_sources
    from compressor.models import create_model

    torch.manual_seed(0)
    model = create_model("vim_demo").eval()  # 65 tokens, merges before layers 2, 4, 6
    gm = convert(model, MergeConfig(num_prune=11, mode=mode))
    sizes = {}
    gm.merge6.register_forward_hook(lambda m, a, out: sizes.__setitem__("final", out[2]))
    src = merge_sources(gm, torch.randn(2, 3, 32, 32))
    assert src.shape == (2, 65 - 33, 64)
    assert torch.equal(src.unique(), torch.tensor([0.0, 1.0]))
    cls_out = gm.steps[-1].cls_out
    assert torch.equal(src[:, cls_out], torch.zeros(2, 64))  # the class token holds no patch
    per_patch = src.sum(dim=1)
    if mode == "merge":
        assert torch.equal(per_patch, torch.ones(2, 64))  # each patch in exactly one final token
        held = src.sum(-1)
        held[:, cls_out] += 1  # the class token's own membership
        assert torch.equal(held, sizes["final"][..., 0])  # same assignment as the sizes
    else:
        assert torch.equal(src.sum(-1)[:, torch.arange(32) != cls_out], torch.ones(2, 31))
        assert per_patch.sum(-1).tolist() == [31.0, 31.0]  # 33 dropped
