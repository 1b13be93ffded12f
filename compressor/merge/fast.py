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

Scores, zero/NaN tokens and ties follow the reference bit for bit where the dot products agree
(see :mod:`compressor.merge.bipartite`). Limits (the dispatcher, :mod:`compressor.merge.dispatch`,
falls back to the reference outside them): ordered merge or prune with the cosine distance (the
paper's setting), no class token or one (two class tokens take the reference), fp16/bf16/fp32 hidden states and residual, sequences up to 4096 tokens, widths
up to 4096.

Gradients: the merged tokens are linear in hidden states, residual and sizes once the assignment
is fixed (the assignment itself is piecewise constant), so the backward is the reference's
vector-Jacobian product recomputed with the kernel's slot map (one scatter and its gather, in
PyTorch); the forward keeps only that ``(b, L)`` int32 map beside its inputs.

With ``TRITON_INTERPRET=1`` set before Triton is imported, the same kernels run on CPU tensors
through Triton's interpreter (slow; the test suite uses it on machines without CUDA).
"""

from __future__ import annotations

import functools

import torch

from .bipartite import NORM_EPS, apply_slots

try:  # Triton ships with torch's Linux wheels; elsewhere the reference path is used
    import triton
except ImportError:  # pragma: no cover - depends on the platform
    triton = None

__all__ = ["available", "interpreting", "supports", "unsupported", "fast_merge", "best_scores", "DTYPES", "MAX_TOKENS", "MAX_WIDTH"]

MAX_TOKENS = 4096
MAX_WIDTH = 4096
#: dtypes of hidden states and residual the kernels read and write (``tl.dot`` takes no fp64)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: Launch parameters (tile sizes, warps); ``benchmarks/tune_fast_merge.py`` measures alternatives.
#: ``gather_warps`` 0: 4 warps up to 512 channels, 8 above.
TUNING = {"score_block_i": 64, "score_block_j": 64, "score_block_d": 64, "score_warps": 4,
          "slot_warps": 4, "gather_warps": 0}


def available() -> bool:
    """Triton can be imported (kernels run on CUDA, or interpreted on the CPU)."""
    return triton is not None


def unsupported(*, ordered: bool = True, distance: str = "cosine", tokens: int, width: int,
                dtype: torch.dtype, residual_dtype: torch.dtype | None = None, class_tokens: int = 1) -> str | None:
    """Why :func:`fast_merge` does not implement this merge (a short phrase), or None if it does.
    ``class_tokens``: how many protected class tokens the sequence holds (the kernels: 0 or 1)."""
    if class_tokens > 1:
        return f"{class_tokens} class tokens, the kernels protect at most one"
    if not ordered or distance != "cosine":
        return f"only the ordered cosine merge is implemented (got ordered={ordered}, distance={distance})"
    for what, dt in (("hidden states", dtype), ("residual", residual_dtype or dtype)):
        if dt not in DTYPES:
            return f"{what} in {str(dt).replace('torch.', '')}, the kernels take float16, bfloat16 or float32"
    if tokens > MAX_TOKENS or width > MAX_WIDTH:
        return f"{tokens} tokens of width {width}, the kernels take at most {MAX_TOKENS} tokens of width {MAX_WIDTH}"
    return None


def supports(*, ordered: bool, distance: str, tokens: int, width: int, dtype: torch.dtype,
             residual_dtype: torch.dtype | None = None, class_tokens: int = 1) -> bool:
    """Whether :func:`fast_merge` implements this merge configuration, size and dtypes."""
    return unsupported(ordered=ordered, distance=distance, tokens=tokens, width=width, dtype=dtype,
                       residual_dtype=residual_dtype, class_tokens=class_tokens) is None


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

    ``hidden, residual: (b, L, d)`` fp16/bf16/fp32, ``size: (b, L, 1)`` fp32 or None (all ones)
    → ``(hidden', residual', size')`` with ``L - r`` tokens, dtypes kept, ``size'`` fp32.
    Equals :func:`~compressor.merge.bipartite.merge_ref` (``ordered=True``, ``distance="cosine"``)
    up to fp32 rounding in the dot products. Inputs on CUDA, or on the CPU under Triton's
    interpreter. Differentiable in ``hidden``, ``residual`` and ``size`` (see the module docstring).
    """
    b, L, d = hidden.shape
    why = unsupported(tokens=L, width=d, dtype=hidden.dtype, residual_dtype=residual.dtype,
                      class_tokens=2 if isinstance(cls_in, (tuple, list)) else 1)
    if why:
        raise ValueError(f"the fast merge cannot run this merge: {why}; use compressor.merge.merge_ref")
    if hidden.device.type != "cuda" and not interpreting():
        raise RuntimeError("the fast merge runs on CUDA tensors (or on the CPU with TRITON_INTERPRET=1 set before import)")
    n = L - int(cls_in is not None)
    if not 0 <= r <= (n + 1) // 2:
        raise ValueError(f"cannot remove {r} of {n} tokens: at most {(n + 1) // 2} (one per source)")
    tensors = (hidden, residual) if size is None else (hidden, residual, size)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _FastMerge.apply(hidden, residual, size, r, cls_in, cls_out, prune)
    return _launch(hidden, residual, size, r, cls_in, cls_out, prune)[:3]


class _FastMerge(torch.autograd.Function):
    """The kernels forward; backward = the reference's VJP with the kernel's assignment."""

    @staticmethod
    def forward(ctx, hidden, residual, size, r, cls_in, cls_out, prune):
        hid_out, res_out, size_out, slot = _launch(hidden, residual, size, r, cls_in, cls_out, prune)
        ctx.save_for_backward(hidden, residual, size, slot)
        ctx.out_len, ctx.prune = hid_out.shape[1], prune
        return hid_out, res_out, size_out

    @staticmethod
    def backward(ctx, g_hidden, g_residual, g_size):
        hidden, residual, size, slot = ctx.saved_tensors
        inputs = [t.detach().requires_grad_() for t in (hidden, residual, size) if t is not None]
        with torch.enable_grad():
            outs = apply_slots(slot.long(), inputs[0], inputs[1], inputs[2] if size is not None else None,
                               ctx.out_len, ctx.prune)
        used = [(o, g) for o, g in zip(outs, (g_hidden, g_residual, g_size)) if o.requires_grad]
        grads = torch.autograd.grad([o for o, _ in used], inputs, [g for _, g in used], allow_unused=True)
        return (*grads, *([None] if size is None else []), None, None, None, None)


def _launch(hidden, residual, size, r, cls_in, cls_out, prune):
    """The three kernels. Returns ``(hidden', residual', size', slot)``, ``slot: (b, L)`` int32."""
    b, L, d = hidden.shape
    _, slot_k, gather_k = _kernels()
    has_cls = cls_in is not None
    n = L - int(has_cls)
    n_src, n_dst = (n + 1) // 2, n // 2
    out_len = L - r
    dev = hidden.device
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    residual = residual if residual.stride(-1) == 1 else residual.contiguous()
    if size is not None:
        size = size.reshape(b, L).float().contiguous()

    t = TUNING
    best, best_idx = _best_per_tile(hidden, cls_in)
    n_tiles = best.shape[1]
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
    return hid_out, res_out, size_out, slot


def _best_per_tile(hidden: torch.Tensor, cls_in: int | None):
    """The score kernel: each source's best cosine and destination per destination tile,
    ``(b, tiles, n_src)`` fp32 and int32 (``hidden`` with unit stride in the last dim)."""
    b, L, d = hidden.shape
    n = L - int(cls_in is not None)
    n_src, n_dst = (n + 1) // 2, n // 2
    interpret = hidden.device.type != "cuda"
    t = TUNING
    block_i, block_j = t["score_block_i"], t["score_block_j"]
    n_tiles = triton.cdiv(n_dst, block_j) if n_dst else 1
    best = torch.empty(b, n_tiles, n_src, dtype=torch.float32, device=hidden.device)
    best_idx = torch.empty(b, n_tiles, n_src, dtype=torch.int32, device=hidden.device)
    precision = "ieee" if hidden.dtype == torch.float32 or interpret else "tf32"  # tf32: unused by fp16/bf16 dots
    _kernels()[0][(b, triton.cdiv(n_src, block_i), n_tiles)](
        hidden, best, best_idx, hidden.stride(0), hidden.stride(1), n_src, n_dst, cls_in if cls_in is not None else 0, d,
        HAS_CLS=cls_in is not None, BLOCK_I=block_i, BLOCK_J=block_j, BLOCK_D=min(t["score_block_d"], _pow2(d)),
        PRECISION=precision, UPCAST=interpret, EPS=NORM_EPS, num_warps=t["score_warps"],
    )
    return best, best_idx


def best_scores(hidden: torch.Tensor, cls_in: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernels match on: each source's best cosine and its destination, ``(b, n_src)``
    fp32 and long, as ``bipartite._scores(...).max(-1)`` computes them (for tests and benchmarks)."""
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    best, idx = _best_per_tile(hidden, cls_in)
    v, tile = best.max(dim=1)  # first tile holding the maximum, as the slot kernel takes it
    return v, idx.gather(1, tile.unsqueeze(1)).squeeze(1).long()
