"""rmeeto: R-MeeTo token merging for Vision Mamba (convert, re-train, export, profile)."""

__version__ = "0.1.0"

from .errors import RmeetoError  # noqa: E402
from .models import VimConfig, VisionMamba, create_model, list_models, load_model, set_backend  # noqa: E402

__all__ = [
    "__version__",
    "RmeetoError",
    "VimConfig",
    "VisionMamba",
    "create_model",
    "list_models",
    "load_model",
    "set_backend",
]
