"""R-MeeTo's token merge: schedule arithmetic, pure matching functions, and the merge module."""

from .bipartite import match, merge_source, merge_wavg, patch_slots
from .module import MERGE_IMPLS, TokenMerge, inference_merge_impl, set_merge_impl
from .schedule import (
    MergeConfig,
    MergeStep,
    class_token_after,
    cls_per_layer,
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
    "inference_merge_impl",
    "match",
    "merge_schedule",
    "merge_source",
    "merge_wavg",
    "patch_slots",
    "reduction_ratio",
    "set_merge_impl",
    "tokens_per_layer",
]
