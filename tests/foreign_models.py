"""Vision Mamba variants that rmeeto did not write, in styles unlike rmeeto's own model, for the
post-hoc conversion tests (``compressor.convert`` on foreign model objects).

- :class:`OfficialLikeVim`: the official hustvl/Vim structure under other names: an asserting
  patch tokenizer, the class token inserted at ``M // 2`` and read back with the same node, blocks
  ``block(hidden, residual, cache=None) -> (hidden, residual)`` whose add+norm is a *function*
  from another package (``foreign_ops``), the final add+norm called as that function, and extra
  forward keyword arguments.
- :class:`HeadClsResidualInside`: class token at the head, blocks that keep the residual inside
  (``block(x) -> x``), a LayerNorm-free RMS norm module of its own, ``features_only`` kwarg.
- :class:`TailClsSequential`: class token at the tail read as ``x[:, -1]``, an ``nn.Sequential``
  trunk called whole, and its own unidirectional Mamba mixer (not rmeeto's).
- :class:`MeanPoolNested`: no class token, a mean-pooling readout, the block list inside an
  ``encoder`` submodule, blocks called with the residual as a keyword argument.
- :class:`OfficialLikeVideo`: VideoMamba's video structure: a 3-d patch convolution, the class
  token prepended on the (batch · frames) axis and sliced back, a temporal position table (its
  rows tell the frame count: no ``num_frames`` attribute), reshapes on traced sizes.
- :class:`DoubleClsVim`: hustvl/Vim's ``use_double_cls_token``: a head class token at 0 and a
  tail one at ``M + 1`` (separate parameters), positions kept in a Python list built from a traced
  size, ``(hidden, residual)`` blocks, readout the mean of the two class tokens.
- :class:`TwoStacks` (interleaved stacks) for the error path.

The factories at the bottom are what ``--model-factory foreign_models:<name>`` names in tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import foreign_ops
from compressor.models.config import VimConfig
from compressor.models.vim import BiMambaMixer


def _mixer(dim: int) -> BiMambaMixer:
    return BiMambaMixer(VimConfig(embed_dim=dim))


class PatchTokenizer(nn.Module):
    def __init__(self, img: int, patch: int, chans: int, dim: int):
        super().__init__()
        self.img = img
        self.conv = nn.Conv2d(chans, dim, patch, patch)

    def forward(self, x):
        b, c, h, w = x.shape
        assert h == self.img and w == self.img, f"input {h}x{w} does not match {self.img}"
        return self.conv(x).flatten(2).transpose(1, 2)


class MambaLayer(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.ssm = _mixer(dim)
        self.norm_w = nn.Parameter(torch.ones(dim))

    def forward(self, hidden, residual=None, cache=None):
        h, residual = foreign_ops.fused_add_rms_norm(hidden, self.norm_w, residual, prenorm=True)
        return self.ssm(h), residual


class OfficialLikeVim(nn.Module):
    def __init__(self, depth=4, dim=32, img=32, patch=8, classes=10, chans=3):
        super().__init__()
        self.img_size = img
        self.tokenizer = PatchTokenizer(img, patch, chans, dim)
        n = (img // patch) ** 2
        self.cls_tok = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_tab = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.stages = nn.ModuleList(MambaLayer(dim) for _ in range(depth))
        self.final_norm_w = nn.Parameter(torch.ones(dim))
        self.classifier = nn.Linear(dim, classes)

    def forward(self, img, return_features=False, cache=None, shuffle_tokens=False):
        x = self.tokenizer(img)
        B, M, _ = x.shape
        pos = M // 2  # one node: places the class token and reads it back
        x = torch.cat((x[:, :pos, :], self.cls_tok.expand(B, -1, -1), x[:, pos:, :]), dim=1)
        x = x + self.pos_tab
        if shuffle_tokens:
            x = x[:, torch.randperm(x.shape[1])]
        hidden, residual = x, None
        for layer in self.stages:
            hidden, residual = layer(hidden, residual, cache=cache)
        out = foreign_ops.fused_add_rms_norm(hidden, self.final_norm_w, residual, prenorm=False)
        feat = out[:, pos, :]
        return feat if return_features else self.classifier(feat)


class RMS(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scale


class ResidualMamba(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.pre = RMS(dim)
        self.mix = _mixer(dim)

    def forward(self, x):
        return x + self.mix(self.pre(x))


class HeadClsResidualInside(nn.Module):
    def __init__(self, depth=4, dim=32, img=32, patch=8, classes=7):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        n = (img // patch) ** 2
        self.class_embedding = nn.Parameter(torch.randn(1, 1, dim))
        self.position_embedding = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.body = nn.ModuleList(ResidualMamba(dim) for _ in range(depth))
        self.out_norm = RMS(dim)
        self.fc = nn.Linear(dim, classes)

    def forward(self, x, features_only=False):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], -1, -1), x], dim=1) + self.position_embedding
        for blk in self.body:
            x = blk(x)
        x = self.out_norm(x)[:, 0]
        return x if features_only else self.fc(x)


class TinyMamba(nn.Module):
    """A unidirectional Mamba mixer written here (sequential scan, no rmeeto code)."""

    def __init__(self, dim, state=4, expand=2):
        super().__init__()
        inner, rank = expand * dim, max(1, math.ceil(dim / 16))
        self.inner, self.state, self.rank = inner, state, rank
        self.proj_in = nn.Linear(dim, 2 * inner, bias=False)
        self.conv = nn.Conv1d(inner, inner, 4, groups=inner, padding=3)
        self.proj_x = nn.Linear(inner, rank + 2 * state, bias=False)
        self.proj_dt = nn.Linear(rank, inner)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, state + 1, dtype=torch.float32)).repeat(inner, 1))
        self.skip = nn.Parameter(torch.ones(inner))
        self.proj_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x):
        b, l, _ = x.shape
        u, z = self.proj_in(x).chunk(2, dim=-1)
        u = F.silu(self.conv(u.transpose(1, 2))[..., :l]).transpose(1, 2)  # (b, l, inner)
        dt, bm, cm = self.proj_x(u).split([self.rank, self.state, self.state], dim=-1)
        delta = F.softplus(self.proj_dt(dt))
        a = -torch.exp(self.A_log)
        h = x.new_zeros(b, self.inner, self.state)
        ys = []
        for t in range(l):
            h = torch.exp(delta[:, t, :, None] * a) * h + (delta[:, t] * u[:, t])[..., None] * bm[:, t, None, :]
            ys.append((h * cm[:, t, None, :]).sum(-1) + self.skip * u[:, t])
        y = torch.stack(ys, dim=1) * F.silu(z)
        return self.proj_out(y)


class TinyBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.mamba = TinyMamba(dim)

    def forward(self, x):
        return x + self.mamba(self.ln(x))


class TailClsSequential(nn.Module):
    def __init__(self, depth=4, dim=24, img=32, patch=8, classes=5):
        super().__init__()
        self.img_size = (img, img)
        self.patchify = nn.Conv2d(3, dim, patch, patch)
        n = (img // patch) ** 2
        self.summary_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.trunk = nn.Sequential(*[TinyBlock(dim) for _ in range(depth)])
        self.ln_out = nn.LayerNorm(dim)
        self.logits = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patchify(x).flatten(2).transpose(1, 2)
        x = torch.cat([x, self.summary_token.expand(x.shape[0], -1, -1)], dim=1) + self.pos
        x = self.ln_out(self.trunk(x))
        return self.logits(x[:, -1])


class Encoder(nn.Module):
    def __init__(self, depth, dim):
        super().__init__()
        self.layers = nn.ModuleList(MambaLayer(dim) for _ in range(depth))
        self.norm_w = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h, r = x, None
        for blk in self.layers:
            h, r = blk(h, residual=r)
        return foreign_ops.fused_add_rms_norm(h, self.norm_w, r, prenorm=False)


class MeanPoolNested(nn.Module):
    def __init__(self, depth=4, dim=32, img=32, patch=8, classes=6):
        super().__init__()
        self.img_size = img
        self.stem = nn.Conv2d(3, dim, patch, patch)
        self.pos = nn.Parameter(torch.randn(1, (img // patch) ** 2, dim) * 0.02)
        self.encoder = Encoder(depth, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, img):
        x = self.stem(img).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.encoder(x).mean(dim=1))


class OfficialLikeVideo(nn.Module):
    def __init__(self, depth=4, dim=32, img=32, patch=8, frames=4, tubelet=1, classes=5):
        super().__init__()
        self.stem = nn.Conv3d(3, dim, (tubelet, patch, patch), (tubelet, patch, patch))
        self.img_size = img
        n = (img // patch) ** 2
        self.cls_tok = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.space_pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.temporal_pos = nn.Parameter(torch.randn(1, frames // tubelet, dim) * 0.02)
        self.stages = nn.ModuleList(MambaLayer(dim) for _ in range(depth))
        self.final_norm_w = nn.Parameter(torch.ones(dim))
        self.classifier = nn.Linear(dim, classes)

    def forward(self, clip):
        x = self.stem(clip)
        B, C, T, H, W = x.shape
        x = x.permute(0, 2, 3, 4, 1).reshape(B * T, H * W, C)
        x = torch.cat((self.cls_tok.expand(x.shape[0], -1, -1), x), dim=1) + self.space_pos
        cls = x[:B, :1, :]
        x = x[:, 1:].reshape(B, T, H * W, C) + self.temporal_pos.unsqueeze(2)
        x = torch.cat((cls, x.reshape(B, T * H * W, C)), dim=1)
        hidden, residual = x, None
        for layer in self.stages:
            hidden, residual = layer(hidden, residual)
        out = foreign_ops.fused_add_rms_norm(hidden, self.final_norm_w, residual, prenorm=False)
        return self.classifier(out[:, 0, :])


class DoubleClsVim(nn.Module):
    def __init__(self, depth=6, dim=32, img=32, patch=8, classes=10):
        super().__init__()
        self.img_size = img
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        n = (img // patch) ** 2
        self.cls_token_head = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.cls_token_tail = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 2, dim) * 0.02)
        self.layers = nn.ModuleList(MambaLayer(dim) for _ in range(depth))
        self.norm_f_w = nn.Parameter(torch.ones(dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, img):
        x = self.patch_embed(img).flatten(2).transpose(1, 2)
        B, M, _ = x.shape
        token_position = [0, M + 1]
        x = torch.cat((self.cls_token_head.expand(B, -1, -1), x, self.cls_token_tail.expand(B, -1, -1)), dim=1)
        hidden, residual = x + self.pos_embed, None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        h = foreign_ops.fused_add_rms_norm(hidden, self.norm_f_w, residual, prenorm=False)
        return self.head((h[:, token_position[0], :] + h[:, token_position[1], :]) / 2)


class TwoStacks(nn.Module):
    """Two block stacks called alternately: cannot be merged consistently."""

    def __init__(self, depth=2, dim=16, img=16, patch=8):
        super().__init__()
        self.img_size = img
        self.stem = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.a = nn.ModuleList(ResidualMamba(dim) for _ in range(depth))
        self.b = nn.ModuleList(ResidualMamba(dim) for _ in range(depth))
        self.head = nn.Linear(dim, 3)

    def forward(self, img):
        x = self.stem(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        for blk_a, blk_b in zip(self.a, self.b):
            x = blk_b(blk_a(x))
        return self.head(x[:, 0])


# factories (``--model-factory foreign_models:<name>``): seeded, so that a rebuild is deterministic


def _seeded(cls, seed, **kw):
    torch.manual_seed(seed)
    return cls(**kw).eval()


def official_like(seed=0, **kw):
    return _seeded(OfficialLikeVim, seed, **kw)


def head_cls_residual_inside(seed=0, **kw):
    return _seeded(HeadClsResidualInside, seed, **kw)


def tail_cls_sequential(seed=0, **kw):
    return _seeded(TailClsSequential, seed, **kw)


def mean_pool_nested(seed=0, **kw):
    return _seeded(MeanPoolNested, seed, **kw)


def official_like_video(seed=0, **kw):
    return _seeded(OfficialLikeVideo, seed, **kw)


def double_cls(seed=0, **kw):
    return _seeded(DoubleClsVim, seed, **kw)
