"""Vision Mamba models: configs, the model, the registry and checkpoint loading."""

from .config import VimConfig
from .registry import create_model, get_config, list_models, register
from .vim import BiMambaMixer, Block, RMSNorm, TokenReadout, VisionMamba, set_backend
from .checkpoint import infer_config, load_official, read_checkpoint

__all__ = [
    "VimConfig",
    "VisionMamba",
    "Block",
    "BiMambaMixer",
    "RMSNorm",
    "TokenReadout",
    "create_model",
    "get_config",
    "list_models",
    "register",
    "set_backend",
    "load_official",
    "read_checkpoint",
    "infer_config",
]
