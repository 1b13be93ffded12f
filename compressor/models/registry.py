"""Named model configurations: ``create_model(name, **overrides)``, ``list_models()``."""

from __future__ import annotations

from ..errors import RmeetoError
from .config import VimConfig
from .vim import VisionMamba

__all__ = ["create_model", "list_models", "get_config", "register"]

_VIM = dict(cls_position="middle", divide_out=True, family="vim")
_VIDEOMAMBA = dict(cls_position="head", divide_out=False, family="videomamba")
# VideoMamba video (Kinetics-400: 8 frames of 224 px, tubelet 1 -> 1 + 8 * 196 = 1569 tokens)
_VIDEO = dict(_VIDEOMAMBA, num_frames=8, tubelet=1, num_classes=400)

_REGISTRY: dict[str, VimConfig] = {
    "vim_tiny": VimConfig(embed_dim=192, **_VIM),
    "vim_small": VimConfig(embed_dim=384, **_VIM),
    "vim_base": VimConfig(embed_dim=768, **_VIM),
    "vim_tiny_stride8": VimConfig(embed_dim=192, stride=8, **_VIM),
    "vim_small_stride8": VimConfig(embed_dim=384, stride=8, **_VIM),
    "vim_base_stride8": VimConfig(embed_dim=768, stride=8, **_VIM),
    "videomamba_tiny": VimConfig(embed_dim=192, **_VIDEOMAMBA),
    "videomamba_small": VimConfig(embed_dim=384, **_VIDEOMAMBA),
    "videomamba_middle": VimConfig(embed_dim=576, depth=32, **_VIDEOMAMBA),
    "videomamba_base": VimConfig(embed_dim=768, **_VIDEOMAMBA),
    "videomamba_video_tiny": VimConfig(embed_dim=192, **_VIDEO),
    "videomamba_video_small": VimConfig(embed_dim=384, **_VIDEO),
    "videomamba_video_middle": VimConfig(embed_dim=576, depth=32, **_VIDEO),
    # test-size configs: the official block, fewer and narrower layers, small images
    "vim_test": VimConfig(embed_dim=32, depth=4, img_size=32, patch_size=8, stride=8, num_classes=10, **_VIM),
    "vim_demo": VimConfig(embed_dim=64, depth=8, img_size=32, patch_size=4, stride=4, num_classes=10, **_VIM),
    "videomamba_test": VimConfig(embed_dim=32, depth=4, img_size=32, patch_size=8, stride=8, num_classes=10, **_VIDEOMAMBA),
    "videomamba_video_test": VimConfig(embed_dim=32, depth=4, img_size=32, patch_size=8, stride=8,
                                       **dict(_VIDEO, num_frames=4, num_classes=10)),
}


def list_models(family: str | None = None) -> list[str]:
    return sorted(n for n, c in _REGISTRY.items() if family is None or c.family == family)


def get_config(name: str, **overrides) -> VimConfig:
    if name not in _REGISTRY:
        raise RmeetoError(f"unknown model {name!r}: choose one of {', '.join(list_models())}")
    try:
        return _REGISTRY[name].replace(**overrides)
    except (TypeError, ValueError) as e:
        raise RmeetoError(f"bad override for model {name!r}: {e}") from None


def create_model(name: str, **overrides) -> VisionMamba:
    """Build a registered model with random weights (``overrides`` replace config fields)."""
    return VisionMamba(get_config(name, **overrides))


def register(name: str, cfg: VimConfig) -> None:
    _REGISTRY[name] = cfg
