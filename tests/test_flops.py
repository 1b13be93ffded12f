"""Analytic FLOPs: the paper's numbers in the paper's convention, and both scan directions."""

from __future__ import annotations

import pytest

from compressor.merge.schedule import MergeConfig, merge_schedule
from compressor.models.registry import get_config
from compressor.flops import count_flops, paper_tokens_per_layer
from compressor.recipes import load_recipe

TOL = 5e-4  # GFLOPs


def _flops(model: str, recipe: str, convention: str = "both") -> dict:
    cfg = get_config(model)
    merge = load_recipe(recipe).merge
    steps = merge_schedule(merge, cfg.num_tokens, cfg.cls_index, cfg.depth)
    return count_flops(cfg, steps, convention, merge=merge)


@pytest.mark.parametrize(
    "model,recipe,expected",
    [("vim_tiny", "r014", 1.2846), ("vim_small", "r031", 3.5846), ("vim_base", "r031", 13.2074)],
)
def test_paper_convention_reproduces_the_paper(model, recipe, expected):
    d = _flops(model, recipe, "paper")
    assert d["convention"] == "paper"
    assert d["gflops"] == d["gflops_paper"]
    assert d["gflops_paper"] == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("model,expected", [("vim_tiny", 1.4926), ("vim_small", 5.1638), ("vim_base", 19.0423)])
def test_paper_convention_unmerged(model, expected):
    # the paper's "unmerged" count: 11 merge modules removing 0 tokens, matching still counted
    assert _flops(model, "none")["gflops_paper"] == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("model,expected", [("vim_tiny", 1.45), ("vim_small", 5.08), ("vim_base", 18.87)])
def test_no_merge_layers_gives_the_paper_table_baseline(model, expected):
    assert count_flops(get_config(model), [], "paper")["gflops_paper"] == pytest.approx(expected, abs=5e-3)


def test_paper_convention_ignores_final_tokens_and_cap():
    # paper-vim-ti merges down to 76 at the end, but the paper counts it as uniform num_prune 5
    assert _flops("vim_tiny", "paper-vim-ti")["gflops_paper"] == pytest.approx(1.2846, abs=TOL)
    assert _flops("vim_tiny", "paper-vim-ti")["tokens"][-1] == 76
    assert _flops("vim_tiny", "paper-vim-ti")["tokens_paper"][-1] == 142
    # num_prune 20: the paper's count goes below zero tokens, the real schedule is capped
    d = _flops("vim_small", "r056")
    assert d["tokens_paper"][-1] == 197 - 11 * 20 and min(d["tokens"]) > 0


def test_videomamba_same_formula_as_vim():
    assert _flops("videomamba_tiny", "paper-videomamba-ti", "paper")["gflops"] == pytest.approx(1.2846, abs=TOL)
    assert _flops("videomamba_small", "paper-videomamba-s", "paper")["gflops"] == pytest.approx(3.5846, abs=TOL)


def test_both_directions_doubles_the_per_direction_terms_only():
    cfg = get_config("vim_small")
    d = count_flops(cfg, [])
    c, e, r, s, k, n = cfg.embed_dim, cfg.d_inner, cfg.rank, cfg.d_state, cfg.d_conv, cfg.num_tokens
    shared = n * c * 2 * e + n * e * c
    per_dir = (n + k - 1) * e * k + n * e * (r + 2 * s) + n * r * e + 9 * n * e * s + 2 * e * n
    assert d["breakdown_both"]["layers"] == pytest.approx(cfg.depth * (shared + 2 * per_dir) / 1e9)
    assert d["breakdown_paper"]["layers"] == pytest.approx(cfg.depth * (shared + per_dir) / 1e9)
    assert d["breakdown_both"]["patch_embed"] == pytest.approx(197 * 384 * 768 / 1e9)
    assert d["breakdown_both"]["head"] == pytest.approx(384 * 1000 / 1e9)
    assert d["gflops"] == d["gflops_both"] > d["gflops_paper"]
    assert d["convention"] == "both" and d["merges"] == 0 and d["breakdown_both"]["merge"] == 0


def test_both_convention_follows_the_real_schedule():
    d = _flops("vim_small", "r031")
    assert d["tokens"][::2] == [197, 186, 175, 164, 153, 142, 131, 120, 109, 98, 87, 76]
    assert d["tokens"] == d["tokens_paper"]  # no cap hit, no final_tokens: the two agree
    assert d["merges"] == 11
    # merges that remove nothing do not run: the "none" recipe costs exactly the baseline
    none = _flops("vim_small", "none")
    assert none["gflops_both"] == count_flops(get_config("vim_small"), [])["gflops_both"]
    assert d["gflops_both"] < none["gflops_both"]


def test_merge_cost_uses_tokens_before_the_merge():
    cfg = get_config("vim_tiny")
    merge = MergeConfig(num_prune=5, layers=(2,))
    steps = merge_schedule(merge, cfg.num_tokens, cfg.cls_index, cfg.depth)
    d = count_flops(cfg, steps, merge=merge)
    c = cfg.embed_dim
    assert d["breakdown_both"]["merge"] == pytest.approx((6 * 197 * c + 2 * c * (197 / 2) ** 2 + 5 * c) / 1e9)
    assert d["breakdown_paper"]["merge"] == pytest.approx(d["breakdown_both"]["merge"])


def test_steps_alone_define_the_paper_convention():
    cfg = get_config("vim_base")
    merge = load_recipe("r031").merge
    steps = merge_schedule(merge, cfg.num_tokens, cfg.cls_index, cfg.depth)
    assert count_flops(cfg, steps, "paper")["gflops"] == pytest.approx(13.2074, abs=TOL)


def test_paper_tokens_per_layer_and_bad_convention():
    cfg = get_config("vim_tiny")
    assert paper_tokens_per_layer(cfg, None) == [197] * 24
    assert paper_tokens_per_layer(cfg, MergeConfig(num_prune=5))[::2][-1] == 142
    with pytest.raises(ValueError, match="convention"):
        count_flops(cfg, [], "flops")
