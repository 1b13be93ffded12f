"""rmeeto: R-MeeTo token merging for Vision Mamba (convert, re-train, export, profile)."""

from ._version import __version__
from .errors import RmeetoError  # noqa: E402
from .models import VimConfig, VisionMamba, create_model, list_models, set_backend  # noqa: E402
from .recipes import Recipe, load_recipe  # noqa: E402
from .convert import convert, save_compressed  # noqa: E402  (the function shadows the module name)
from .loading import load_model  # noqa: E402
from .export import export_onnx  # noqa: E402
from .inference import optimize_for_inference  # noqa: E402
from .merge import set_merge_impl  # noqa: E402

__all__ = [
    "__version__",
    "RmeetoError",
    "VimConfig",
    "VisionMamba",
    "create_model",
    "list_models",
    "load_model",
    "set_backend",
    "Recipe",
    "load_recipe",
    "convert",
    "save_compressed",
    "export_onnx",
    "optimize_for_inference",
    "set_merge_impl",
]
