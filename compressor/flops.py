"""Analytic FLOPs of a (merged) Vision Mamba, in the paper's formula.

The paper's formula (as the R-MeeTo paper counts FLOPs, with the official repository's
``utils/calc_flops.py`` hooks), per layer with ``N`` tokens, ``C`` = embed_dim, ``E = expand·C``
(``2C``), ``R`` = dt_rank, ``S`` = d_state, ``K`` = d_conv::

    in_proj  N·C·2E         out_proj  N·E·C                      (shared by both directions)
    conv1d   (N+K−1)·E·K    x_proj    N·E·(R+2S)    dt_proj N·R·E
    scan     9·N·E·S + 2·E·N                                    (per scan direction)

plus per merge of ``T`` tokens (class token included) removing ``r``: ``6·T·C + 2C·(T/2)² + r·C``,
plus the patch embedding ``num_tokens·C·(in_chans·patch²)`` (the paper writes ``197·C·768``) and
the head ``C·num_classes``. One multiply-add counts as one FLOP.

Two conventions, both returned by :func:`count_flops`:

- ``"both"`` (what this model computes): the per-direction terms are counted for **both** scan
  directions (the forward and the flipped backward scan), in_proj/out_proj once; ``N`` follows
  the real merge schedule (``r = min(num_prune, (L−1)//2)``, ``final_tokens`` honoured); merges
  that remove nothing do not run and cost nothing.
- ``"paper"`` (the numbers the paper prints): one scan direction only; ``N`` decreases by
  ``num_prune`` at every merge layer of the merge config, with no cap and ``final_tokens``
  ignored; every merge layer pays the matching cost, even with ``num_prune = 0``. This gives
  1.2846 / 3.5846 / 13.2074 G for Vim-Ti r5 / S r11 / B r11 and, with the ``none`` recipe's
  merge layers (11 merges of 0 tokens), 1.4926 / 5.1638 / 19.0423 G. Without any merge layer it
  gives 1.4491 / 5.0769 / 18.8684 G, the baselines of the paper's table (1.45 / 5.08 / 18.87).
  With ``num_prune × merges >= tokens`` its token counts go negative: the numbers are nominal.
"""

from __future__ import annotations

from typing import Sequence

from .models.config import VimConfig
from .merge.schedule import MergeConfig, MergeStep, tokens_per_layer

__all__ = ["CONVENTIONS", "count_flops", "paper_tokens_per_layer", "paper_reduction_ratio"]

CONVENTIONS = ("both", "paper")


def _layer_flops(cfg: VimConfig, n: float, directions: int) -> float:
    """One Vim block with ``n`` tokens: in/out projections once, the rest per scan direction."""
    c, e, r, s, k = cfg.embed_dim, cfg.d_inner, cfg.rank, cfg.d_state, cfg.d_conv
    shared = n * c * 2 * e + n * e * c
    per_direction = (n + k - 1) * e * k + n * e * (r + 2 * s) + n * r * e + 9 * n * e * s + 2 * e * n
    return shared + directions * per_direction


def _merge_flops(cfg: VimConfig, tokens_in: float, r: int) -> float:
    """Matching (normalise + cosine scores of the two halves) and the weighted sum of ``r``."""
    c = cfg.embed_dim
    return 6 * tokens_in * c + 2 * c * (tokens_in / 2) ** 2 + r * c


def paper_tokens_per_layer(cfg: VimConfig, merge: MergeConfig | None) -> list[int]:
    """Tokens per layer as the paper counts them: minus ``num_prune`` at every merge layer, no
    cap, ``final_tokens`` ignored (may go negative for large ``num_prune``)."""
    layers = set(merge.merge_layers(cfg.depth)) if merge is not None else set()
    out, n = [], cfg.num_tokens
    for i in range(cfg.depth):
        if i in layers:
            n -= merge.num_prune
        out.append(n)
    return out


def paper_reduction_ratio(cfg: VimConfig, merge: MergeConfig | None) -> float:
    """Removed token-layer slots over ``depth · num_tokens``, the paper's way (``132·r/4728`` at
    depth 24 / interval 2 / 197 tokens: 0.14, 0.28, 0.31, 0.42, 0.56 for r = 5, 10, 11, 15, 20)."""
    return 1.0 - sum(paper_tokens_per_layer(cfg, merge)) / (cfg.depth * cfg.num_tokens)


def _total(cfg: VimConfig, tokens: list[int], merges: list[tuple[int, int]], directions: int) -> dict[str, float]:
    """FLOPs by part, in GFLOPs. ``merges``: (tokens_in, r) of each merge that is counted."""
    c = cfg.embed_dim
    parts = {
        "patch_embed": cfg.num_tokens * c * cfg.in_chans * cfg.patch_size**2,
        "layers": sum(_layer_flops(cfg, n, directions) for n in tokens),
        "merge": sum(_merge_flops(cfg, t, r) for t, r in merges),
        "head": c * cfg.num_classes,
    }
    return {k: v / 1e9 for k, v in parts.items()}


def count_flops(
    cfg: VimConfig,
    steps: Sequence[MergeStep] = (),
    convention: str = "both",
    *,
    merge: MergeConfig | None = None,
) -> dict:
    """GFLOPs of ``cfg`` under the merge ``steps`` (from ``merge_schedule``), both conventions.

    ``merge`` (the recipe's ``[merge]`` table) defines the paper convention's merge layers and
    ``num_prune``; without it they are taken from ``steps`` (their layers, the first step's r).
    ``convention`` picks which count ``"gflops"`` reports. Returns::

        {"gflops": ..., "convention": "both" | "paper",
         "gflops_both": ..., "gflops_paper": ...,
         "breakdown_both": {...}, "breakdown_paper": {...},   # patch_embed/layers/merge/head
         "tokens": [...per layer, real schedule...], "tokens_paper": [...], "merges": len(steps)}
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    steps = list(steps)
    tokens = tokens_per_layer(steps, cfg.num_tokens, cfg.depth)
    both = _total(cfg, tokens, [(s.tokens_in, s.r) for s in steps], directions=2)

    if merge is None:
        merge = MergeConfig(num_prune=steps[0].r, layers=tuple(s.layer for s in steps)) if steps else None
    tokens_paper = paper_tokens_per_layer(cfg, merge)
    paper_layers = merge.merge_layers(cfg.depth) if merge is not None else []
    paper_merges = [(tokens_paper[i - 1], merge.num_prune) for i in paper_layers]
    paper = _total(cfg, tokens_paper, paper_merges, directions=1)

    g_both, g_paper = sum(both.values()), sum(paper.values())
    return {
        "gflops": g_both if convention == "both" else g_paper,
        "convention": convention,
        "gflops_both": g_both,
        "gflops_paper": g_paper,
        "breakdown_both": both,
        "breakdown_paper": paper,
        "tokens": tokens,
        "tokens_paper": tokens_paper,
        "merges": len(steps),
    }
