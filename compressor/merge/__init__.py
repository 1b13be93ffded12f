"""R-MeeTo's token merge: schedule arithmetic, pure matching functions, and the merge module."""

from .bipartite import match, merge_source, merge_wavg, patch_slots
from .module import TokenMerge
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
    "MergeConfig",
    "MergeStep",
    "TokenMerge",
    "class_token_after",
    "cls_per_layer",
    "match",
    "merge_schedule",
    "merge_source",
    "merge_wavg",
    "patch_slots",
    "reduction_ratio",
    "tokens_per_layer",
]
