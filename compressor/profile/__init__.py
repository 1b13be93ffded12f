"""Profiling: analytic FLOPs (the paper's formula, both scan directions or the paper's convention),
timing per execution backend and batch size, merge overhead, accuracy, and reports."""

from ..flops import CONVENTIONS, count_flops, paper_reduction_ratio, paper_tokens_per_layer
from .run import ProfileInterrupted, ProfileTarget, load_targets, profile_models, run_profile
from .settings import ProfileSettings

__all__ = [
    "CONVENTIONS",
    "count_flops",
    "paper_reduction_ratio",
    "paper_tokens_per_layer",
    "ProfileInterrupted",
    "ProfileSettings",
    "ProfileTarget",
    "load_targets",
    "profile_models",
    "run_profile",
]
