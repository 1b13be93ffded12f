"""The merge in three Triton kernels: the fast twin of :class:`~compressor.merge.module.TokenMerge`'s
reference path (:func:`~compressor.merge.bipartite.match` + one ``scatter_add``).

The reference launches ~30 small kernels per merge (norms, matmul, max, argsort, cumsum,
scatters, casts); inside a CUDA graph at batch 1 those launches cost more than the tokens save.
Here one merge is three launches, with no host synchronisation and no data-dependent Python:

1. ``score_kernel`` (grid ``b × source tiles × destination tiles``): cosine similarity of every
   source (even patch) to every destination (odd patch) on the tensor cores, reduced in registers
   to each source's best score and destination per destination tile (the ``(n/2)²`` score matrix
   never reaches memory).
2. ``slot_kernel`` (grid ``b``): reduces over the destination tiles, ranks the sources by best score (ties: lower index first), marks
   the ``r`` best as removed, and builds the ordered slot map with the class token folded in
   (exactly :func:`~compressor.merge.bipartite.patch_slots` followed by the re-insertion of
   :func:`~compressor.merge.bipartite.match`); then the inverse map: positions sorted by slot and
   each slot's offset into them.
3. ``gather_kernel`` (grid ``b × output tokens``): each output token sums its members (itself
   and the sources merged into it, in position order, like the reference's ``scatter_add`` on the
   CPU) weighted by size, divides, casts, and writes hidden, residual and size in one pass. No
   atomics, no zero-filled buffer, deterministic.

Limits (the caller falls back to the reference outside them): ordered merge or prune with the
cosine distance (the paper's setting), sequences up to 4096 tokens, widths up to 4096.

With ``TRITON_INTERPRET=1`` set before Triton is imported, the same kernels run on CPU tensors
through Triton's interpreter (slow; the test suite uses it on machines without CUDA).
"""

from __future__ import annotations

import functools

import torch

try:  # Triton ships with torch's Linux wheels; elsewhere the reference path is used
    import triton
except ImportError:  # pragma: no cover - depends on the platform
    triton = None

__all__ = ["available", "interpreting", "supports", "fast_merge", "MAX_TOKENS", "MAX_WIDTH"]

MAX_TOKENS = 4096
MAX_WIDTH = 4096

#: Launch parameters (tile sizes, warps); ``benchmarks/tune_fast_merge.py`` measures alternatives.
#: ``gather_warps`` 0: 4 warps up to 512 channels, 8 above.
TUNING = {"score_block_i": 64, "score_block_j": 64, "score_block_d": 64, "score_warps": 4,
          "slot_warps": 4, "gather_warps": 0}


def available() -> bool:
    """Triton can be imported (kernels run on CUDA, or interpreted on the CPU)."""
    return triton is not None


def supports(*, ordered: bool, distance: str, tokens: int, width: int) -> bool:
    """Whether :func:`fast_merge` implements this merge configuration and size."""
    return ordered and distance == "cosine" and tokens <= MAX_TOKENS and width <= MAX_WIDTH


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(n, 1) - 1).bit_length())


def interpreting() -> bool:
    """Triton runs its kernels on the CPU interpreter (``TRITON_INTERPRET=1`` was set before
    Triton was imported; the test suite does this on machines without CUDA)."""
    return triton is not None and bool(triton.knobs.runtime.interpret)


@functools.lru_cache(maxsize=1)
def _kernels():
    """The (score, slot, gather) kernels, JIT-compiled on first launch (or interpreted)."""
    if triton is None:
        raise RuntimeError("the fast merge needs Triton: pip install triton (it comes with torch on Linux)")
    from . import _triton_kernels as k

    return tuple(triton.jit(fn) for fn in (k.score_kernel, k.slot_kernel, k.gather_kernel))


def fast_merge(hidden: torch.Tensor, residual: torch.Tensor, size: torch.Tensor | None, r: int,
               cls_in: int | None, cls_out: int | None, *, prune: bool = False):
    """One ordered cosine merge (or prune) of ``r`` tokens, matching on ``hidden``.

    ``hidden, residual: (b, L, d)``, ``size: (b, L, 1)`` fp32 or None (all ones) →
    ``(hidden', residual', size')`` with ``L - r`` tokens, dtypes kept, ``size'`` fp32.
    Equals ``TokenMerge``'s reference path (``ordered=True``, ``distance="cosine"``) up to fp32
    rounding in the cosine scores. Inputs on CUDA, or on the CPU under Triton's interpreter.
    """
    b, L, d = hidden.shape
    interpret = hidden.device.type != "cuda"
    if interpret and not interpreting():
        raise RuntimeError("the fast merge runs on CUDA tensors (or on the CPU with TRITON_INTERPRET=1 set before import)")
    score_k, slot_k, gather_k = _kernels()
    has_cls = cls_in is not None
    n = L - int(has_cls)
    n_src, n_dst = (n + 1) // 2, n // 2
    if not 0 <= r <= n_src:
        raise ValueError(f"cannot remove {r} of {n} tokens: at most {n_src} (one per source)")
    out_len = L - r
    dev = hidden.device
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    residual = residual if residual.stride(-1) == 1 else residual.contiguous()
    if size is not None:
        size = size.reshape(b, L).float().contiguous()

    t = TUNING
    block_i, block_j = t["score_block_i"], t["score_block_j"]
    n_tiles = triton.cdiv(n_dst, block_j) if n_dst else 1
    best = torch.empty(b, n_tiles, n_src, dtype=torch.float32, device=dev)
    best_idx = torch.empty(b, n_tiles, n_src, dtype=torch.int32, device=dev)
    block_d = min(t["score_block_d"], _pow2(d))
    precision = "ieee" if hidden.dtype == torch.float32 or interpret else "tf32"
    score_k[(b, triton.cdiv(n_src, block_i), n_tiles)](
        hidden, best, best_idx, hidden.stride(0), hidden.stride(1), n_src, n_dst, cls_in if has_cls else 0, d,
        HAS_CLS=has_cls, BLOCK_I=block_i, BLOCK_J=block_j, BLOCK_D=block_d, PRECISION=precision, UPCAST=interpret,
        num_warps=t["score_warps"],
    )
    slot = torch.empty(b, L, dtype=torch.int32, device=dev)
    perm = torch.empty(b, L, dtype=torch.int32, device=dev)
    offs = torch.empty(b, out_len + 1, dtype=torch.int32, device=dev)
    block_s = _pow2(n_src)
    slot_k[(b,)](
        best, best_idx, slot, perm, offs, L, n_src, n_dst, n_tiles, r, cls_in if has_cls else 0, cls_out if has_cls else 0,
        out_len, HAS_CLS=has_cls, PRUNE=prune, BLOCK_S=block_s, BLOCK_K=min(block_s, max(16, 16384 // block_s)),
        BLOCK_L=_pow2(L), BLOCK_O=_pow2(out_len + 2), num_warps=t["slot_warps"],
    )
    hid_out = torch.empty(b, out_len, d, dtype=hidden.dtype, device=dev)
    res_out = torch.empty(b, out_len, d, dtype=residual.dtype, device=dev)
    size_out = torch.empty(b, out_len, 1, dtype=torch.float32, device=dev)
    block = _pow2(d, 32)
    gather_k[(b, out_len)](
        hidden, residual, size if size is not None else best, perm, offs, hid_out, res_out, size_out,
        L, out_len, d, hidden.stride(0), hidden.stride(1), residual.stride(0), residual.stride(1),
        hid_out.stride(0), hid_out.stride(1), res_out.stride(0), res_out.stride(1),
        HAS_SIZE=size is not None, BLOCK_D=block, num_warps=t["gather_warps"] or (4 if block <= 512 else 8),
    )
    return hid_out, res_out, size_out
