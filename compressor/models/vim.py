"""Vision Mamba (Vim and VideoMamba image models), pure PyTorch, official state_dict layout.

One implementation for both families; :class:`~compressor.models.config.VimConfig` says where the
class token sits and how the two scan directions combine. The hot ops go through
:mod:`compressor.ops`, so the same module runs on the reference, chunked or CUDA backends.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn.init import trunc_normal_

from .. import ops
from .config import VimConfig

__all__ = ["VisionMamba", "BiMambaMixer", "Block", "DropPath", "RMSNorm", "TokenReadout", "set_backend"]


class DropPath(nn.Module):
    """Stochastic depth: in training, zero each sample's branch with probability ``p`` and scale
    the kept ones by ``1 / (1 - p)``; the identity in eval mode. (Defined here rather than taken
    from timm: importing timm.layers costs seconds at start-up, for one line of arithmetic.)"""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep) if keep > 0.0 else x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


class RMSNorm(nn.Module):
    """Fused ``residual += x`` then RMSNorm (residual kept in fp32). Returns ``(normed, residual)``."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.backend = "auto"

    def forward(self, x, residual=None):
        return ops.add_rms_norm(x, residual, self.weight, self.eps, backend=self.backend)


class BiMambaMixer(nn.Module):
    """Bidirectional Mamba mixer ("bimamba v2"): one scan forward, one on the flipped sequence
    with its own ``_b`` parameters; outputs summed (``/ 2`` when ``divide_out``) before ``out_proj``."""

    def __init__(self, cfg: VimConfig):
        super().__init__()
        d, e, n, r = cfg.embed_dim, cfg.d_inner, cfg.d_state, cfg.rank
        self.d_inner, self.d_state, self.dt_rank = e, n, r
        self.divide_out = cfg.divide_out
        self.backend = "auto"
        a_log = torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(e, 1)
        self.A_log = nn.Parameter(a_log.clone())
        self.D = nn.Parameter(torch.ones(e))
        self.A_b_log = nn.Parameter(a_log.clone())
        self.D_b = nn.Parameter(torch.ones(e))
        self.in_proj = nn.Linear(d, 2 * e, bias=False)
        self.conv1d = nn.Conv1d(e, e, cfg.d_conv, groups=e, padding=cfg.d_conv - 1)
        self.x_proj = nn.Linear(e, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, e)
        self.conv1d_b = nn.Conv1d(e, e, cfg.d_conv, groups=e, padding=cfg.d_conv - 1)
        self.x_proj_b = nn.Linear(e, r + 2 * n, bias=False)
        self.dt_proj_b = nn.Linear(r, e)
        self.out_proj = nn.Linear(e, d, bias=False)
        for dt_proj in (self.dt_proj, self.dt_proj_b):
            _init_dt_proj(dt_proj, r)

    def _params(self, backward: bool) -> ops.Direction:
        """One direction's parameters (the ``_b`` set when ``backward``)."""
        sfx = "_b" if backward else ""
        conv, x_proj, dt_proj = getattr(self, "conv1d" + sfx), getattr(self, "x_proj" + sfx), getattr(self, "dt_proj" + sfx)
        a_log, d_skip = (self.A_b_log, self.D_b) if backward else (self.A_log, self.D)
        return ops.Direction(conv.weight.squeeze(1), conv.bias, x_proj.weight, dt_proj.weight, dt_proj.bias, a_log, d_skip)

    def forward(self, h):
        """``h: (b, l, d)`` → ``(b, l, d)``; everything but ``out_proj`` is :func:`ops.bimamba_inner`."""
        y = ops.bimamba_inner(h, self.in_proj.weight, self._params(False), self._params(True), self.divide_out, self.backend)
        return self.out_proj(y)


class Block(nn.Module):
    """``residual += drop_path(hidden)``; ``hidden = mixer(RMSNorm(residual))``. A leaf for torch.fx."""

    def __init__(self, cfg: VimConfig, drop_path: float = 0.0):
        super().__init__()
        self.mixer = BiMambaMixer(cfg)
        self.norm = RMSNorm(cfg.embed_dim, cfg.norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, hidden, residual=None):
        h, residual = self.norm(self.drop_path(hidden), residual)
        return self.mixer(h), residual


class TokenReadout(nn.Module):
    """Feature from the final token sequence: the class token at ``index``, or the
    size-weighted mean of all tokens when ``index`` is None (``size`` weights merged tokens)."""

    def __init__(self, index: int | None):
        super().__init__()
        self.index = index

    def forward(self, x, size=None):
        if self.index is not None:
            return x[:, self.index]
        if size is None:
            return x.mean(dim=1)
        return (x * size).sum(dim=1) / size.sum(dim=1)

    def extra_repr(self) -> str:
        return f"index={self.index}"


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VimConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, cfg.stride)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionMamba(nn.Module):
    """Vision Mamba image classifier with the official parameter names and shapes."""

    def __init__(self, cfg: VimConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        if cfg.cls_position != "none":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, d))
        self.patch_embed = PatchEmbed(cfg)
        self.head = nn.Linear(d, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        # official schedule: layer i gets rate·(i−1)/(depth−1) for i ≥ 1, layer 0 none; final add gets rate
        dpr = [0.0] + [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.layers = nn.ModuleList(Block(cfg, dpr[i]) for i in range(cfg.depth))
        self.norm_f = RMSNorm(d, cfg.norm_eps)
        self.drop_path = DropPath(cfg.drop_path_rate) if cfg.drop_path_rate > 0 else nn.Identity()
        self.readout = TokenReadout(cfg.cls_index)
        self._init_weights()

    def _init_weights(self):
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cfg.cls_position != "none":
            trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m not in self._dt_projs():
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for blk in self.layers:  # GPT-2 style rescale of the residual branch, as mamba's init
            nn.init.kaiming_uniform_(blk.mixer.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                blk.mixer.out_proj.weight /= math.sqrt(self.cfg.depth)

    def _dt_projs(self):
        return {m for blk in self.layers for m in (blk.mixer.dt_proj, blk.mixer.dt_proj_b)}

    def embed(self, img):
        """Patches, class token inserted at its position, absolute position embedding."""
        x = self.patch_embed(img)
        idx = self.cfg.cls_index
        if idx is not None:
            cls = self.cls_token.expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :idx], cls, x[:, idx:]], dim=1)
        return x + self.pos_embed

    def forward_features(self, img):
        hidden, residual = self.embed(img), None
        for blk in self.layers:
            hidden, residual = blk(hidden, residual)
        out, _ = self.norm_f(self.drop_path(hidden), residual)
        return self.readout(out)

    def forward(self, img):
        return self.head(self.forward_features(img))


def _init_dt_proj(dt_proj: nn.Linear, dt_rank: int, dt_min=1e-3, dt_max=0.1, floor=1e-4):
    """mamba's dt init: weights U(±rank^-0.5), bias = softplus⁻¹(dt) with dt log-uniform."""
    std = dt_rank**-0.5
    nn.init.uniform_(dt_proj.weight, -std, std)
    dt = torch.exp(torch.rand(dt_proj.out_features) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=floor)
    with torch.no_grad():
        dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))


def set_backend(module: nn.Module, backend: str) -> nn.Module:
    """Select the op backend (``auto``, ``ref``, ``chunked``, ``cuda``, ``triton``) of every Mamba op in
    ``module`` (a model or a converted GraphModule). Returns ``module``."""
    if backend not in ops.BACKENDS:
        from ..errors import BackendUnavailable

        raise BackendUnavailable(f"unknown backend {backend!r}: choose one of {', '.join(ops.BACKENDS)}")
    for m in module.modules():
        if isinstance(m, (BiMambaMixer, RMSNorm)):
            m.backend = backend
    return module
