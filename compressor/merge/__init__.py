"""R-MeeTo's token merge: schedule arithmetic, pure matching functions, the reference merge and its
Triton twin behind one dispatcher, and the merge module."""

from .bipartite import match, merge_ref, merge_source, merge_wavg, patch_slots, slot_map
from .dispatch import MERGE_IMPLS, inference_merge_impl, merge_tokens, resolve_merge_impl
from .module import TokenMerge, set_merge_impl
from .schedule import (
    MergeConfig,
    MergeStep,
    class_token_after,
    cls_per_layer,
    cls_positions,
    merge_schedule,
    reduction_ratio,
    tokens_per_layer,
)

__all__ = [
    "MERGE_IMPLS",
    "MergeConfig",
    "MergeStep",
    "TokenMerge",
    "class_token_after",
    "cls_per_layer",
    "cls_positions",
    "inference_merge_impl",
    "match",
    "merge_ref",
    "merge_schedule",
    "merge_source",
    "merge_tokens",
    "merge_wavg",
    "patch_slots",
    "reduction_ratio",
    "resolve_merge_impl",
    "set_merge_impl",
    "slot_map",
    "tokens_per_layer",
]
