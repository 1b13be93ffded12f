"""One merge, two implementations, one dispatcher (as :mod:`compressor.ops` dispatches its backends).

- ``torch``: :func:`~compressor.merge.bipartite.merge_ref`, pure PyTorch: any device, autograd,
  exportable, every merge configuration.
- ``triton``: :func:`~compressor.merge.fast.fast_merge`, three Triton kernels (ordered cosine merge
  or prune, fp16/bf16/fp32, at most one class token); asking for it where it cannot run is a
  one-line error.
- ``auto``: ``triton`` for CUDA tensors when Triton is installed and the merge is supported, no
  gradient is needed and nothing is being compiled; ``torch`` otherwise. Training stays on the
  reference (the path its results were measured with); export always traces the reference.
"""

from __future__ import annotations

import torch

from ..errors import BackendUnavailable
from . import fast
from .bipartite import merge_ref

__all__ = ["MERGE_IMPLS", "inference_merge_impl", "merge_tokens", "resolve_merge_impl"]

MERGE_IMPLS = ("auto", "torch", "triton")


def _exporting() -> bool:
    return torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


def inference_merge_impl(impl: str, device_type: str) -> str:
    """The merge that runs for inference (no gradients) on ``device_type`` under ``impl``:
    ``auto`` is ``triton`` on CUDA when Triton is installed, else ``torch``."""
    if impl != "auto":
        return impl
    return "triton" if device_type == "cuda" and fast.available() else "torch"


def _why_not_triton(hidden, residual, ordered, distance, class_tokens) -> str | None:
    if not fast.available():
        return "Triton is not installed (pip install triton; it comes with torch on Linux)"
    if hidden.device.type != "cuda" and not fast.interpreting():
        return f"the tensors are on the {hidden.device.type}, the kernels run on CUDA"
    return fast.unsupported(ordered=ordered, distance=distance, tokens=hidden.shape[1], width=hidden.shape[-1],
                            dtype=hidden.dtype, residual_dtype=residual.dtype, class_tokens=class_tokens)


def _class_tokens(cls_in) -> int:
    return 0 if cls_in is None else len(cls_in) if isinstance(cls_in, (tuple, list)) else 1


def resolve_merge_impl(impl: str, hidden: torch.Tensor, residual: torch.Tensor, *, ordered: bool = True,
                       distance: str = "cosine", cls_in: int | tuple[int, ...] | None = None) -> str:
    """Turn ``impl`` into ``torch`` or ``triton`` for these tensors; check an explicit ``triton``.
    ``cls_in``: the class-token position(s); two class tokens always take ``torch``."""
    if impl not in MERGE_IMPLS:
        raise BackendUnavailable(f"unknown merge implementation {impl!r}: choose one of {', '.join(MERGE_IMPLS)}")
    if impl == "torch" or _exporting():
        return "torch"
    why = _why_not_triton(hidden, residual, ordered, distance, _class_tokens(cls_in))
    if impl == "triton":
        if why:
            raise BackendUnavailable(f"the triton merge cannot run this merge: {why}; use impl 'torch' or 'auto'")
        return "triton"
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or residual.requires_grad)
    use = not why and hidden.device.type == "cuda" and not needs_grad and not torch.compiler.is_compiling()
    return "triton" if use else "torch"


def merge_tokens(hidden: torch.Tensor, residual: torch.Tensor, size: torch.Tensor | None, r: int,
                 cls_in: int | tuple[int, ...] | None, cls_out: int | tuple[int, ...] | None, *, prune: bool = False,
                 ordered: bool = True, distance: str = "cosine", impl: str = "auto"):
    """One merge (or prune) of ``r`` tokens with the implementation ``impl`` resolves to.

    ``hidden, residual: (b, L, d)``, ``size: (b, L, 1)`` fp32 or None (all ones) →
    ``(hidden', residual', size')`` with ``L - r`` tokens; see :func:`merge_ref`.
    """
    if resolve_merge_impl(impl, hidden, residual, ordered=ordered, distance=distance, cls_in=cls_in) == "triton":
        return fast.fast_merge(hidden, residual, size, r, cls_in, cls_out, prune=prune)
    return merge_ref(hidden, residual, size, r, cls_in, cls_out, prune=prune, ordered=ordered, distance=distance)
